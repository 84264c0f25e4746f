"""Callers' quotas (auth.callers.<name>.rate_limit, max_concurrent_calls) against the real
server: refused before anything is planned or sent, with QuotaFailure and RetryInfo, counted
by caller and reason, and one caller over its quota never slows another."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import error_details_pb2, status_pb2

from aggregator.config import ConfigError, config_from_mapping
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http, wait_for
from tests.e2e.test_auth import AUDIENCE, ISSUER, bearer, public_pem, rsa_key, token


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return rsa_key()


def quota_auth(tmp_path: Path, key: rsa.RSAPrivateKey, **greedy: Any) -> dict[str, Any]:
    """Two callers: ``greedy`` with the quota given, ``polite`` with none."""
    public = tmp_path / "issuer.pem"
    public.write_bytes(public_pem(key))
    return {
        "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "keys": [str(public)]},
        "callers": {
            "greedy": {"token_subject": "greedy", "upstreams": ["*"], **greedy},
            "polite": {"token_subject": "polite", "upstreams": ["*"]},
        },
    }


async def call(stub: Any, key: rsa.RSAPrivateKey, caller: str, path: str = "/echo/x") -> Any:
    request = pb.AggregateRequest(targets=[http("t", path)])
    metadata = bearer(token(key, subject=caller))
    return await collect(stub.Aggregate(request, timeout=5, metadata=metadata))


def details(trailers: dict[str, Any]) -> tuple[error_details_pb2.QuotaFailure, float]:
    """The QuotaFailure and RetryInfo's delay of grpc-status-details-bin."""
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    failure, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
    assert any(packed.Unpack(failure) for packed in status.details)
    assert any(packed.Unpack(retry) for packed in status.details)
    return failure, retry.retry_delay.ToNanoseconds() / 1e9


def rejections(server: Any, caller: str, reason: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "aggregator_caller_rejections_total", {"caller": caller, "reason": reason}
    )
    return float(value or 0)


async def test_a_caller_over_its_rate_is_refused_before_anything_is_sent(
    start_server, rest, issuer_key, tmp_path
):
    auth = quota_auth(tmp_path, issuer_key, rate_limit={"rate": 0.5, "burst": 2})
    server, stub = await start_server(None, auth)
    answers = [await call(stub, issuer_key, "greedy") for _ in range(3)]
    assert [code for _, code, _, _ in answers] == [
        grpc.StatusCode.OK, grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED,
    ]  # fmt: skip
    results, _, message, trailers = answers[2]
    assert results == []
    assert "'greedy' is over its rate limit" in message
    assert len(rest.recorder.requests) == 2  # the third reached no upstream
    failure, retry_after = details(trailers)
    assert failure.violations[0].subject == "caller:greedy"
    assert 0 < retry_after <= 2.0  # a token every 2 s
    assert trailers["x-aggregate-succeeded"] == "0"  # the usual trailers are there too
    assert rejections(server, "greedy", "rate_limit") == 1
    # The other caller has its own quota (none): not touched by greedy's.
    assert (await call(stub, issuer_key, "polite"))[1] == grpc.StatusCode.OK


async def test_max_concurrent_calls_refuses_the_next_call_of_that_caller_only(
    start_server, rest, issuer_key, tmp_path
):
    auth = quota_auth(tmp_path, issuer_key, max_concurrent_calls=1)
    server, stub = await start_server(None, auth)
    held = asyncio.create_task(call(stub, issuer_key, "greedy", "/hang"))
    try:
        await wait_for(rest.recorder.hanging)  # greedy's one call is in flight
        _, code, message, trailers = await call(stub, issuer_key, "greedy")
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_calls" in message
        failure, retry_after = details(trailers)
        assert failure.violations[0].subject == "caller:greedy"
        assert retry_after > 0
        assert rejections(server, "greedy", "concurrency") == 1
        assert (await call(stub, issuer_key, "polite"))[1] == grpc.StatusCode.OK
    finally:
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
    # The slot is given back when the call ends, however it ends.
    assert (await call(stub, issuer_key, "greedy"))[1] == grpc.StatusCode.OK


async def test_one_caller_over_its_quota_never_slows_another(
    start_server, rest, issuer_key, tmp_path
):
    """Both callers at once: greedy sends far over its rate with its calls held at the
    upstream; polite's calls all succeed, as fast as polite's calls alone."""
    auth = quota_auth(
        tmp_path, issuer_key, rate_limit={"rate": 1, "burst": 2}, max_concurrent_calls=2
    )
    _, stub = await start_server(None, auth)
    started = time.perf_counter()
    alone = [await call(stub, issuer_key, "polite", "/delay/20") for _ in range(5)]
    alone_seconds = time.perf_counter() - started
    greedy = [asyncio.create_task(call(stub, issuer_key, "greedy", "/hang")) for _ in range(40)]
    try:
        started = time.perf_counter()
        together = [await call(stub, issuer_key, "polite", "/delay/20") for _ in range(5)]
        together_seconds = time.perf_counter() - started
        # All but the two greedy calls its burst let through (held at the upstream) end.
        finished = asyncio.as_completed(greedy, timeout=10)
        codes = [(await next(finished))[1] for _ in range(38)]
        await wait_for(rest.recorder.hanging)
        await wait_for(rest.recorder.hanging)
    finally:
        for task in greedy:
            task.cancel()
        await asyncio.gather(*greedy, return_exceptions=True)
    assert [code for _, code, _, _ in alone + together] == [grpc.StatusCode.OK] * 10
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 38
    # A generous bound: what matters is that polite never waited for greedy's quota.
    assert together_seconds < alone_seconds * 3 + 0.5


def test_caller_quota_keys_are_checked():
    with pytest.raises(ConfigError) as raised:
        config_from_mapping(
            {
                "auth": {
                    "jwt": {"issuer": "i", "audience": "a", "secret_file": "/nonexistent"},
                    "callers": {
                        "c": {
                            "token_subject": "c",
                            "upstreams": ["*"],
                            "rate_limit": {"rate": 0, "scope": "global"},
                            "max_concurrent_calls": 0,
                        }
                    },
                }
            }
        )
    problems = "\n".join(raised.value.problems)
    assert "auth.callers.c.rate_limit.scope: unknown key" in problems
    assert "auth.callers.c.rate_limit.burst: required" in problems
    assert "auth.callers.c.rate_limit.rate:" in problems
    assert "auth.callers.c.max_concurrent_calls:" in problems
