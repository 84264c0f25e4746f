"""Caller identity and permissions (bearer JWTs, mTLS identities), and what reaches upstreams
(forward_headers, allowed_methods, path_prefixes), against the real server and upstreams."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aggregator.config import ConfigError, config_from_mapping
from aggregator.security import files
from aggregator.security.outbound import path_allowed
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import collect, http, rpc_target
from tests.e2e.test_tls import credentials, server_tls
from tests.upstreams import GrpcUpstream, RestUpstream

ISSUER = "https://issuer.test"
AUDIENCE = "aggregator"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def token(key: Any, subject: str = "web-frontend", algorithm: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 300}
    payload.update(claims)
    headers = {"kid": claims.pop("kid")} if "kid" in claims else None
    payload.pop("kid", None)
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa_key()


@pytest.fixture
def jwt_auth(tmp_path: Path, signing_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    public = tmp_path / "issuer.pem"
    public.write_bytes(public_pem(signing_key))
    return {
        "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "keys": [str(public)]},
        "callers": {
            "web": {"token_subject": "web-frontend", "upstreams": ["rest"]},
            "ops": {"token_subject": "ops", "upstreams": ["*"]},
        },
    }


@pytest.fixture
def serve(start_server: Any) -> Any:
    """Starts an aggregator with an ``auth`` section; returns it and a plaintext stub."""

    async def start(auth: dict[str, Any], server: dict[str, Any] | None = None, **upstreams: Any):
        return await start_server(server, auth, **upstreams)

    return start


def nothing_sent(rest: RestUpstream, rpc: GrpcUpstream) -> bool:
    return rest.recorder.requests == [] and rpc.recorder.requests == []


BOTH = (http("page", "/echo/page"), rpc_target("price", "Echo", b"p"))


async def aggregate(stub, *targets: pb.Target, metadata=()):
    request = pb.AggregateRequest(targets=list(targets) or [http("page", "/echo/page")])
    return await collect(stub.Aggregate(request, timeout=5, metadata=metadata))


async def test_a_call_without_credentials_is_unauthenticated(serve, jwt_auth, rest, rpc):
    _, stub = await serve(jwt_auth)
    results, code, details, trailers = await aggregate(stub, *BOTH)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in details
    assert results == []
    assert trailers["x-aggregate-succeeded"] == "0"
    assert nothing_sent(rest, rpc)


async def test_a_valid_token_calls_its_upstreams(serve, jwt_auth, signing_key, rest):
    _, stub = await serve(jwt_auth)
    results, code, _, _ = await aggregate(stub, metadata=bearer(token(signing_key)))
    assert code == grpc.StatusCode.OK
    assert [r.outcome for r in results] == [pb.OUTCOME_OK]
    assert [seen["path"] for seen in rest.recorder.requests] == ["/echo/page"]
    assert "authorization" not in rest.recorder.requests[0]["headers"]  # not forwarded


def hs256_by_hand(secret: bytes, payload: dict[str, Any]) -> str:
    """An HS256 token signed with any bytes (PyJWT refuses to sign with a public key)."""

    def part(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signed = part(b'{"alg":"HS256","typ":"JWT"}') + b"." + part(json.dumps(payload).encode())
    signature = hmac.new(secret, signed, hashlib.sha256).digest()
    return (signed + b"." + part(signature)).decode()


def bad_token(case: str, signing_key: rsa.RSAPrivateKey) -> tuple[str, str]:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ops", "exp": now + 300}
    if case == "expired":
        return token(signing_key, exp=now - 3600, iat=now - 7200), "expired"
    if case == "audience":
        return token(signing_key, aud="someone-else"), "Audience doesn't match"
    if case == "issuer":
        return token(signing_key, iss="https://evil.test"), "issuer"
    if case == "signature":
        return token(rsa_key()), "matches no configured key"
    if case == "no expiry":
        del claims["exp"]
        return jwt.encode(claims, signing_key, algorithm="RS256"), "exp"
    if case == "alg none":
        return jwt.encode(claims, None, algorithm="none"), "'none' is not accepted"
    if case == "hs256 with the public key":  # the classic confusion
        return hs256_by_hand(public_pem(signing_key), claims), "'HS256' is not accepted"
    return "not-a-jwt", "not a JWT"


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "audience",
        "issuer",
        "signature",
        "no expiry",
        "alg none",
        "hs256 with the public key",
        "not a jwt",
    ],
)
async def test_a_bad_token_is_unauthenticated(serve, jwt_auth, signing_key, rest, rpc, case):
    value, expected = bad_token(case, signing_key)
    _, stub = await serve(jwt_auth)
    _, code, details, _ = await aggregate(stub, *BOTH, metadata=bearer(value))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert expected in details
    assert nothing_sent(rest, rpc)


async def test_an_upstream_not_allowed_is_permission_denied_and_nothing_is_sent(
    serve, jwt_auth, signing_key, rest, rpc
):
    _, stub = await serve(jwt_auth)
    results, code, details, _ = await aggregate(stub, *BOTH, metadata=bearer(token(signing_key)))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == "caller 'web' may not call upstream 'rpc' (targets 'price')"
    assert results == []
    assert nothing_sent(rest, rpc)


async def test_a_verified_but_unknown_subject_is_permission_denied(
    serve, jwt_auth, signing_key, rest, rpc
):
    _, stub = await serve(jwt_auth)
    _, code, details, _ = await aggregate(stub, metadata=bearer(token(signing_key, "intruder")))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == (
        "token subject 'intruder' (not in auth.callers) may not call upstream 'rest' "
        "(targets 'page')"
    )
    assert nothing_sent(rest, rpc)


async def test_a_caller_allowed_everything_reaches_every_upstream(
    serve, jwt_auth, signing_key, rest, rpc
):
    _, stub = await serve(jwt_auth)
    _, code, _, _ = await aggregate(stub, *BOTH, metadata=bearer(token(signing_key, "ops")))
    assert code == grpc.StatusCode.OK
    assert len(rest.recorder.requests) == len(rpc.recorder.requests) == 1


async def test_health_and_reflection_stay_open(serve, jwt_auth):
    aggregator, _ = await serve(jwt_auth)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{aggregator.port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        async for response in stream:
            names = {s.name for s in response.list_services_response.service}
            assert "aggregator.v1.Aggregator" in names


def mtls_auth(tmp_path: Path, ca: trustme.CA, clients: trustme.CA) -> tuple[dict, dict]:
    server = {"tls": server_tls(tmp_path, ca, clients)}
    auth = {"callers": {"billing": {"certificate": "billing.internal", "upstreams": ["rest"]}}}
    return server, auth


async def mtls_aggregate(port: int, channel_credentials, *targets: pb.Target):
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials) as channel:
        return await aggregate(pb_grpc.AggregatorStub(channel), *targets)


async def test_a_client_certificate_identifies_the_caller(serve, tmp_path, rest, rpc):
    ca, clients = trustme.CA(), trustme.CA()
    server, auth = mtls_auth(tmp_path, ca, clients)
    aggregator, _ = await serve(auth, server=server)
    billing = credentials(ca, clients.issue_cert("billing.internal"))
    _, code, _, _ = await mtls_aggregate(aggregator.port, billing)
    assert code == grpc.StatusCode.OK
    _, code, details, _ = await mtls_aggregate(aggregator.port, billing, *BOTH)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details == "caller 'billing' may not call upstream 'rpc' (targets 'price')"
    assert len(rest.recorder.requests) == 1
    assert rpc.recorder.requests == []


async def test_a_certificate_of_an_unknown_caller_is_permission_denied(serve, tmp_path, rest):
    ca, clients = trustme.CA(), trustme.CA()
    server, auth = mtls_auth(tmp_path, ca, clients)
    aggregator, _ = await serve(auth, server=server)
    stranger = credentials(ca, clients.issue_cert("stranger.internal", common_name="stranger"))
    _, code, details, _ = await mtls_aggregate(aggregator.port, stranger)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert details.startswith("certificate 'stranger.internal' (not in auth.callers)")
    assert rest.recorder.requests == []


async def test_jwks_keys_rotate_without_restart(serve, tmp_path, rest, monkeypatch):
    monkeypatch.setattr(files, "CHECK_INTERVAL", 0.0)
    old, new = rsa_key(), rsa_key()
    jwks = tmp_path / "jwks.json"

    def publish(key: rsa.RSAPrivateKey, kid: str) -> None:
        entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        jwks.write_text(json.dumps({"keys": [{**entry, "kid": kid, "alg": "RS256"}]}))

    publish(old, "2024")
    auth = {
        "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "keys": [str(jwks)]},
        "callers": {"web": {"token_subject": "web-frontend", "upstreams": ["rest"]}},
    }
    _, stub = await serve(auth)
    assert (await aggregate(stub, metadata=bearer(token(old, kid="2024"))))[1] == grpc.StatusCode.OK
    publish(new, "2025")
    _, code, _, _ = await aggregate(stub, metadata=bearer(token(new, kid="2025")))
    assert code == grpc.StatusCode.OK
    _, code, _, _ = await aggregate(stub, metadata=bearer(token(old, kid="2024")))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_an_hmac_secret_file_verifies_hs256_tokens(serve, tmp_path, rest):
    secret = b"a shared secret of at least thirty-two bytes"
    (tmp_path / "secret").write_bytes(secret + b"\n")
    auth = {
        "jwt": {
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "algorithms": ["HS256"],
            "secret_file": str(tmp_path / "secret"),
        },
        "callers": {"web": {"token_subject": "web-frontend", "upstreams": ["rest"]}},
    }
    _, stub = await serve(auth)
    good = token(secret, algorithm="HS256")
    assert (await aggregate(stub, metadata=bearer(good)))[1] == grpc.StatusCode.OK
    forged = token(b"another secret of at least thirty-two bytes", algorithm="HS256")
    assert (await aggregate(stub, metadata=bearer(forged)))[1] == grpc.StatusCode.UNAUTHENTICATED


async def test_forwarded_headers_reach_http_and_grpc_upstreams(start_server, rest, rpc):
    _, stub = await start_server(
        web={"kind": "http", "url": rest.url, "forward_headers": ["Authorization", "x-tenant"]},
        prices={"kind": "grpc", "address": rpc.address, "forward_headers": ["x-tenant"]},
    )
    metadata = (("authorization", "Bearer abc"), ("x-tenant", "t-1"), ("x-secret", "no"))
    targets = (http("page", "/echo", upstream="web"), rpc_target("p", "Echo", upstream="prices"))
    _, code, _, _ = await aggregate(stub, *targets, metadata=metadata)
    assert code == grpc.StatusCode.OK
    headers = rest.recorder.requests[0]["headers"]
    assert (headers["authorization"], headers["x-tenant"]) == ("Bearer abc", "t-1")
    assert "x-secret" not in headers
    seen = rpc.recorder.requests[0]["metadata"]
    assert seen["x-tenant"] == "t-1"
    assert "authorization" not in seen
    assert "x-secret" not in seen


async def test_a_header_the_target_sets_wins_over_a_forwarded_one(start_server, rest):
    _, stub = await start_server(
        web={"kind": "http", "url": rest.url, "forward_headers": ["x-tenant"]}
    )
    target = http("page", "/echo", upstream="web", headers={"X-Tenant": "own"})
    _, code, _, _ = await aggregate(stub, target, metadata=(("x-tenant", "caller"),))
    assert code == grpc.StatusCode.OK
    assert rest.recorder.requests[0]["headers"]["x-tenant"] == "own"


async def test_methods_and_paths_outside_the_upstreams_rules_are_refused(start_server, rest, rpc):
    _, stub = await start_server(
        web={
            "kind": "http",
            "url": rest.url,
            "allowed_methods": ["GET"],
            "path_prefixes": ["/echo/public/"],
        },
        prices={
            "kind": "grpc",
            "address": rpc.address,
            "allowed_methods": ["/test.Upstream/Delay"],
        },
    )
    targets = (
        http("ok", "/echo/public/a", upstream="web"),
        http("post", "/echo/public/a", upstream="web", method="POST"),
        http("admin", "/echo/admin", upstream="web"),
        http("encoded", "/echo/public%2Fx", upstream="web"),
        rpc_target("echo", "Echo", b"x", upstream="prices"),
    )
    _, code, details, _ = await aggregate(stub, *targets)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.split("; ") == [
        "target 'post': http.method: POST is not in upstreams.web.allowed_methods (GET)",
        "target 'admin': http.path: is outside upstreams.web.path_prefixes (/echo/public/)",
        "target 'encoded': http.path: is outside upstreams.web.path_prefixes (/echo/public/)",
        "target 'echo': grpc.method: is not in upstreams.prices.allowed_methods "
        "(/test.Upstream/Delay)",
    ]
    assert nothing_sent(rest, rpc)


async def test_a_service_wildcard_allows_its_methods(start_server, rpc):
    _, stub = await start_server(
        prices={"kind": "grpc", "address": rpc.address, "allowed_methods": ["/test.Upstream/*"]}
    )
    _, code, _, _ = await aggregate(stub, rpc_target("echo", "Echo", b"x", upstream="prices"))
    assert code == grpc.StatusCode.OK


def test_path_prefixes_match_whole_segments_as_sent_and_decoded():
    assert path_allowed("/v1", ["/v1"])
    assert path_allowed("/v1/items", ["/v1"])
    assert not path_allowed("/v1admin", ["/v1"])
    assert path_allowed("/v1/items", ["/v1/"])
    assert not path_allowed("/v1", ["/v1/"])
    assert not path_allowed("/v%31/items", ["/v1/"])  # as sent, it is not under /v1/
    assert not path_allowed("/v1%2F../x", ["/v1/"])


def auth_problems(auth: dict[str, Any], server: dict[str, Any] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(
            {
                "server": server or {},
                "upstreams": {"rest": {"kind": "http", "url": "http://127.0.0.1:1"}},
                "auth": auth,
            }
        )
    return caught.value.problems


def test_auth_config_problems_name_their_keys(tmp_path):
    assert auth_problems({"jwt": {"algorithms": ["none", "RS256"]}, "callers": {}}) == [
        "auth.jwt.issuer: required (tokens are checked against it)",
        "auth.jwt.audience: required (tokens are checked against it)",
        "auth.jwt.algorithms: none: not one of ES256, ES384, ES512, EdDSA, HS256, HS384, HS512, "
        'PS256, PS384, PS512, RS256, RS384, RS512 ("none" is never accepted)',
        "auth.jwt.keys: required by the public-key algorithms",
        "auth.callers: at least one caller is required",
    ]
    assert auth_problems(
        {
            "callers": {
                "a": {"certificate": "a.internal", "upstreams": ["rest", "nope"]},
                "b": {"token_subject": "b"},
                "c": {"upstreams": ["*"]},
            }
        }
    ) == [
        "auth.callers.a.upstreams: 'nope' is not a configured upstream",
        'auth.callers.b.upstreams: required (a list of upstream names, or "*")',
        "auth.callers.c: needs a certificate or a token_subject to be known by",
        "auth.callers.a.certificate: needs server.tls.client_ca (no client certificates otherwise)",
        "auth.callers.b.token_subject: needs auth.jwt",
    ]


def test_forward_headers_never_include_hop_by_hop_headers():
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(
            {
                "upstreams": {
                    "rest": {
                        "kind": "http",
                        "url": "http://127.0.0.1:1",
                        "forward_headers": ["authorization", "Connection"],
                    }
                }
            }
        )
    assert caught.value.problems == [
        "upstreams.rest.forward_headers: 'connection' is a hop-by-hop or reserved header and "
        "is never forwarded"
    ]
