"""Converters for keys that name files: each file is read and checked at load (a PEM
certificate, key or secret; a FileDescriptorSet), so a bad file fails check-config, not the
first call that needs it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aggregator.config.convert import strings, text
from aggregator.schema import load_descriptor_set
from aggregator.security import pem


def _file_of(check: Callable[[str], object]) -> Callable[[Any], str]:
    """A converter for a path whose file ``check`` reads (raising ValueError when unusable)."""

    def convert(value: Any) -> str:
        check(text(value))
        return str(value)

    return convert


cert_file = _file_of(pem.certificates)
key_file = _file_of(pem.private_key)
secret_file = _file_of(pem.secret)


def verification_key_files(value: Any) -> tuple[str, ...]:
    paths = strings(value)
    for path in paths:
        pem.verification_keys(path)
    return paths


def key_pair_problem(cert: str, key: str) -> str | None:
    """Why ``key`` is not the private key of ``cert`` (None when it is, or either is unset)."""
    if cert and key:
        try:
            pem.check_key_pair(cert, key)
        except ValueError as exc:
            return str(exc)
    return None


def descriptors(value: Any) -> str:
    """``reflection``, or a FileDescriptorSet file that is read (and its imports resolved) now."""
    if value == "reflection":
        return "reflection"
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} must be reflection or the path of a FileDescriptorSet file")
    load_descriptor_set(value)
    return value
