"""Who is calling, and which upstreams they may call (the ``auth`` section).

A caller is known by a bearer token (a JWT verified with PyJWT against the configured keys,
issuer, audience and expiry) or, failing that, by its mTLS client certificate (a subject
alternative name or the subject CN). A presented token decides: a bad token is refused even
when the certificate would have been good, so a caller never silently acts as someone else.

- no usable identity -> UNAUTHENTICATED;
- a verified identity that is not in ``auth.callers``, or a caller naming an upstream it may
  not call -> PERMISSION_DENIED naming the upstreams;
- a caller naming an aggregate it may not run (``auth.callers.<name>.aggregates``) ->
  PERMISSION_DENIED naming it. A named aggregate's upstreams are the operator's choice: the
  caller's ``upstreams`` limit only the targets it sends itself.

Both are decided before anything is sent upstream. Health and reflection are not behind this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from aggregator.config import AuthConfig, JwtConfig
from aggregator.errors import CallFailure
from aggregator.security import pem
from aggregator.security.files import Watched

_ANY = "*"
# The key type each algorithm family verifies with: PyJWT raises TypeError (not a JWT error)
# when handed an RSA key for ES256 or an EC key for RS256, so a key of another type is never
# tried (and an error from a key is read as "not this key" all the same).
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
    "HS": (bytes,),
}


@dataclass(frozen=True, slots=True)
class Caller:
    name: str  # "" for a verified identity that auth.callers does not name
    known_by: str  # how it proved who it is: "token subject 'web'", "certificate 'a.b'"
    upstreams: frozenset[str]
    aggregates: frozenset[str] = frozenset()

    def may_call(self, upstream: str) -> bool:
        return _ANY in self.upstreams or upstream in self.upstreams

    def may_run(self, aggregate: str) -> bool:
        """Whether it may run the named aggregate (auth.callers.<name>.aggregates)."""
        return _ANY in self.aggregates or aggregate in self.aggregates

    def __str__(self) -> str:
        return f"caller {self.name!r}" if self.name else f"{self.known_by} (not in auth.callers)"


class Gate:
    """Identifies callers and checks their plans against ``auth.callers``."""

    def __init__(self, auth: AuthConfig | None) -> None:
        self._auth = auth
        callers = auth.callers.values() if auth else ()
        self._verifier = TokenVerifier(auth.jwt) if auth and auth.jwt else None
        self._by_subject = {c.token_subject: c.name for c in callers if c.token_subject}
        self._by_certificate = {c.certificate: c.name for c in callers if c.certificate}

    def __repr__(self) -> str:
        if self._auth is None:
            return "<Gate [open]>"
        return (
            f"<Gate [{len(self._auth.callers)} callers, tokens "
            f"{'on' if self._verifier else 'off'}, certificates "
            f"{'on' if self._by_certificate else 'off'}]>"
        )

    @property
    def enabled(self) -> bool:
        """Whether callers must identify themselves (an ``auth`` section is configured)."""
        return self._auth is not None

    def identify(
        self,
        metadata: Iterable[tuple[str, Any]],
        auth_context: Mapping[str, Iterable[bytes]],
    ) -> Caller | None:
        """The caller, or None when auth is off; raises CallFailure UNAUTHENTICATED."""
        if self._auth is None:
            return None
        token = _bearer_token(metadata)
        if token is not None and self._verifier is not None:
            subject = self._verifier.subject(token)
            return self._caller(self._by_subject.get(subject), f"token subject {subject!r}")
        names = certificate_names(auth_context)
        for name in names:
            if name in self._by_certificate:
                return self._caller(self._by_certificate[name], f"certificate {name!r}")
        if names:
            return self._caller(None, f"certificate {names[0]!r}")
        raise CallFailure(grpc.StatusCode.UNAUTHENTICATED, self._how_to_authenticate())

    def _caller(self, name: str | None, known_by: str) -> Caller:
        assert self._auth is not None
        config = self._auth.callers.get(name) if name else None
        upstreams = frozenset(config.upstreams) if config else frozenset()
        aggregates = frozenset(config.aggregates) if config else frozenset()
        return Caller(
            name=name or "", known_by=known_by, upstreams=upstreams, aggregates=aggregates
        )

    def _how_to_authenticate(self) -> str:
        ways = []
        if self._verifier is not None:
            ways.append("a bearer token (metadata authorization: Bearer <jwt>)")
        if self._by_certificate:
            ways.append("a client certificate")
        return "no credentials: send " + " or ".join(ways or ["credentials"])

    def authorize_aggregate(self, caller: Caller | None, aggregate: str) -> None:
        """Raises CallFailure PERMISSION_DENIED unless ``caller`` may run the named aggregate
        (asked before the name is looked up: a caller learns nothing of the names it may not
        run). A named aggregate's upstreams are the operator's choice: auth.callers' upstreams
        limit ad-hoc targets only."""
        if caller is not None and not caller.may_run(aggregate):
            raise CallFailure(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller} may not run aggregate {_shown(aggregate)}",
            )

    def authorize_calls(self, caller: Caller | None, calls: Iterable[tuple[str, str]]) -> None:
        """``authorize`` on (target id, upstream name) pairs: server.py passes those of the
        request as received, so an unauthorized caller is refused before its request is
        planned, at the cost of one pass over it."""
        if caller is None:
            return
        denied: dict[str, list[str]] = {}
        for target_id, upstream in calls:
            if not caller.may_call(upstream):
                denied.setdefault(upstream, []).append(target_id)
        if denied:
            listed = "; ".join(
                f"upstream {name!r} (targets {', '.join(map(repr, ids))})"
                for name, ids in sorted(denied.items())
            )
            raise CallFailure(grpc.StatusCode.PERMISSION_DENIED, f"{caller} may not call {listed}")


def _shown(name: str) -> str:
    """A caller-given name in a message: quoted, and cut when long."""
    return repr(name[:64]) + (" (cut)" if len(name) > 64 else "")


def _bearer_token(metadata: Iterable[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def certificate_names(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The client certificate's subject alternative names, then its subject CN."""
    names: list[str] = []
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        for raw in auth_context.get(key, ()):
            name = raw.decode("utf-8", "replace")
            if name not in names:
                names.append(name)
    return names


class TokenVerifier:
    """Verifies bearer JWTs; the key files are re-read when they change (key rotation)."""

    def __init__(self, config: JwtConfig) -> None:
        self._config = config
        paths = [*config.keys, *([config.secret_file] if config.secret_file else [])]
        self._keys = Watched("auth.jwt keys", paths, self._load)

    def __repr__(self) -> str:
        return f"<TokenVerifier {self._config.issuer} [{len(self._keys.current())} keys]>"

    def _load(self) -> list[tuple[str | None, Any]]:
        keys = [key for path in self._config.keys for key in pem.verification_keys(path)]
        if self._config.secret_file:
            keys.append((None, pem.secret(self._config.secret_file)))
        return keys

    def subject(self, token: str) -> str:
        """The verified token's subject; raises CallFailure UNAUTHENTICATED saying why not."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise _unauthenticated("the bearer token is not a JWT") from None
        algorithm = header.get("alg")
        if algorithm not in self._config.algorithms:
            raise _unauthenticated(f"bearer token algorithm {algorithm!r} is not accepted")
        claims = self._verified_claims(token, str(algorithm), header.get("kid"))
        subject = claims.get(self._config.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise _unauthenticated(f"bearer token claim {self._config.subject_claim!r} is empty")
        return subject

    def _verified_claims(self, token: str, algorithm: str, kid: Any) -> dict[str, Any]:
        key_types = _KEY_TYPES.get(algorithm[:2], ())
        candidates: list[Any] = [
            key
            for key_id, key in self._keys.current()
            if isinstance(key, key_types) and (kid is None or key_id in (None, kid))
        ]
        config = self._config
        for key in candidates:
            try:
                return jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    audience=config.audience,
                    issuer=config.issuer,
                    leeway=config.leeway,
                    options={"require": ["exp", "iss", "aud", config.subject_claim]},
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError, TypeError, ValueError):
                # Not this key (another may be the one: rotation), or not a key for this
                # algorithm (an EC key of another curve). Either way the next key is tried;
                # none left is UNAUTHENTICATED below, never an exception out of the handler.
                continue
            except jwt.InvalidTokenError as exc:
                raise _unauthenticated(f"bearer token rejected: {exc}") from None
        raise _unauthenticated("bearer token signature matches no configured key")


def _unauthenticated(message: str) -> CallFailure:
    return CallFailure(grpc.StatusCode.UNAUTHENTICATED, message)
