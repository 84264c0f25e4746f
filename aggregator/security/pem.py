"""Reading certificates, private keys and token-verification keys from files.

Each reader raises ValueError with one sentence, so the config reader can report the key
path that named the file (``server.tls.key: /etc/tls/key.pem holds no private key``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    PrivateKeyTypes,
    PublicKeyTypes,
)


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from exc


def certificates(path: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file (a chain or a CA bundle); at least one."""
    data = read_file(path)
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise ValueError(f"{path}: holds no PEM certificate")
    return found


def private_key(path: str) -> PrivateKeyTypes:
    """An unencrypted PEM private key (a server cannot ask anyone for a passphrase)."""
    data = read_file(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise ValueError(f"{path}: the private key is encrypted; give an unencrypted one") from exc
    except ValueError as exc:
        raise ValueError(f"{path}: holds no PEM private key") from exc


def check_key_pair(cert_path: str, key_path: str) -> None:
    """Raises ValueError unless the first certificate in ``cert_path`` is for the key."""
    leaf = certificates(cert_path)[0]
    key = private_key(key_path)
    if _public_bytes(leaf.public_key()) != _public_bytes(key.public_key()):
        raise ValueError(f"{key_path} is not the private key of the certificate in {cert_path}")


def _public_bytes(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verification_keys(path: str) -> list[tuple[str | None, Any]]:
    """(key id, key) pairs for verifying tokens: a PEM public key (no id) or a JWKS file."""
    data = read_file(path)
    if data.lstrip().startswith(b"{"):
        return _jwks(path, data)
    try:
        return [(None, serialization.load_pem_public_key(data))]
    except ValueError as exc:
        raise ValueError(f"{path}: holds neither a PEM public key nor a JWKS document") from exc


def _jwks(path: str, data: bytes) -> list[tuple[str | None, Any]]:
    try:
        keys = jwt.PyJWKSet.from_dict(json.loads(data)).keys
    except (ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
        raise ValueError(f"{path}: not a usable JWKS document: {exc}") from exc
    return [(key.key_id, key.key) for key in keys]


def secret(path: str) -> bytes:
    """A shared HMAC secret: the file's bytes without surrounding whitespace."""
    value = read_file(path).strip()
    if len(value) < 32:
        raise ValueError(f"{path}: an HMAC secret must be at least 32 bytes")
    return value
