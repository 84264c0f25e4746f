"""Limits held across replicas (limits.backend: redis) against a real redis-server: the GCRA
script, an upstream's scope: global limit shared by two servers, a caller's rate held by real
server processes together, and what each on_backend_error does when Redis dies or stalls."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry, Counter

from aggregator.config import LimitsConfig
from aggregator.policies.global_limits import Decision, SharedLimits
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import aggregator_process, collect, http
from tests.e2e.test_auth import bearer, rsa_key, token
from tests.e2e.test_composition import redis_process
from tests.e2e.test_quotas import quota_auth
from tests.upstreams import RestUpstream, free_port

# Generous for a loaded test machine: the default (5ms) is for production.
TIMEOUT = "250ms"


@pytest.fixture
async def redis() -> AsyncIterator[tuple[str, Any]]:
    with redis_process() as (url, process):
        yield url, process


@pytest.fixture(scope="module")
def issuer_key() -> rsa.RSAPrivateKey:
    return rsa_key()


def limits(url: str, on_backend_error: str = "local", prefix: str = "t") -> dict[str, Any]:
    return {
        "backend": "redis", "redis_url": url, "key_prefix": prefix,
        "on_backend_error": on_backend_error, "timeout": TIMEOUT,
    }  # fmt: skip


async def test_gcra_admits_the_burst_then_the_rate_and_prefixes_keep_limits_apart(redis):
    url, _ = redis
    errors = Counter("errors", "", registry=CollectorRegistry())
    shared = SharedLimits(LimitsConfig("redis", url, "a", "deny", 0.25), errors)
    other = SharedLimits(LimitsConfig("redis", url, "b", "deny", 0.25), errors)
    try:
        key = shared.key("caller", "c")
        decisions = [await shared.admit(key, 2.0, 3, 0.0) for _ in range(4)]
        assert [d.admitted if d else None for d in decisions] == [True, True, True, False]
        assert 0 < waits(decisions)[3] <= 0.5  # one each 1/rate
        # An upstream's attempt may wait for its turn: admitted, and told how long to wait.
        reserved = await shared.admit(key, 2.0, 3, 1.0)
        assert reserved is not None
        assert reserved.admitted
        assert 0 < reserved.wait <= 0.5
        # Another deployment's prefix: a limit of its own.
        assert await other.admit(other.key("caller", "c"), 2.0, 3, 0.0) == Decision(True, 0.0)
        assert errors._value.get() == 0  # type: ignore[attr-defined]
    finally:
        await shared.aclose()
        await other.aclose()


async def test_many_admissions_at_once_all_reach_redis(redis):
    """More admissions in flight than the pool has connections: they queue for one, none is
    refused by the client (counted as a backend failure) and the burst still holds."""
    url, _ = redis
    errors = Counter("errors", "", registry=CollectorRegistry())
    shared = SharedLimits(LimitsConfig("redis", url, "many", "deny", 2.0), errors)
    try:
        key = shared.key("upstream", "u")
        decisions = await asyncio.gather(*(shared.admit(key, 0.01, 50, 0.0) for _ in range(300)))
        assert errors._value.get() == 0  # type: ignore[attr-defined]
        assert sum(bool(d and d.admitted) for d in decisions) == 50
    finally:
        await shared.aclose()


def waits(decisions: list[Decision | None]) -> list[float]:
    return [d.wait if d else -1.0 for d in decisions]


async def test_an_upstream_limit_with_scope_global_holds_for_both_servers(
    start_server, rest, redis
):
    url, _ = redis
    outcomes = {}
    for scope in ("local", "global"):
        limited = {"kind": "http", "url": rest.url}
        limited["rate_limit"] = {"rate": 0.2, "burst": 3, "scope": scope}
        shared = limits(url, prefix=scope)  # apart: the two cases never meet
        stubs = [(await start_server(limits=shared, limited=limited))[1] for _ in range(2)]
        first = [await target_outcome(stubs[0]) for _ in range(3)]
        outcomes[scope] = (first, await target_outcome(stubs[1]))
    ok, rejected = pb.OUTCOME_OK, pb.OUTCOME_REJECTED
    assert outcomes["local"] == ([ok, ok, ok], ok)  # each server its own bucket
    assert outcomes["global"] == ([ok, ok, ok], rejected)  # one bucket for both


async def target_outcome(stub: Any) -> int:
    request = pb.AggregateRequest(targets=[http("t", "/echo/x", upstream="limited")])
    results, _, _, _ = await collect(stub.Aggregate(request, timeout=0.5))
    return int(results[0].outcome)


async def call_as(stub: Any, key: rsa.RSAPrivateKey, caller: str) -> grpc.StatusCode:
    request = pb.AggregateRequest(targets=[http("t", "/echo/x")])
    metadata = bearer(token(key, subject=caller))
    _, code, _, _ = await collect(stub.Aggregate(request, timeout=5, metadata=metadata))
    return code


def backend_errors(server: Any) -> float:
    value = server.metrics.registry.get_sample_value("aggregator_limit_backend_errors_total")
    return float(value or 0)


OK, EXHAUSTED = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED
# After Redis dies: what a caller with burst 2 and 2 calls spent (in Redis) gets for 4 calls.
AFTER_REDIS_DIED = {
    "allow": [OK] * 4,
    "deny": [EXHAUSTED] * 4,
    "local": [OK, OK, EXHAUSTED, EXHAUSTED],  # the process's own bucket, still full
}


@pytest.mark.parametrize("on_backend_error", sorted(AFTER_REDIS_DIED))
async def test_redis_killed_mid_run(
    start_server, redis, issuer_key, tmp_path, caplog, on_backend_error
):
    url, process = redis
    auth = quota_auth(tmp_path, issuer_key, rate_limit={"rate": 0.1, "burst": 2})
    server, stub = await start_server(None, auth, limits=limits(url, on_backend_error))
    assert [await call_as(stub, issuer_key, "greedy") for _ in range(3)] == [OK, OK, EXHAUSTED]
    assert backend_errors(server) == 0
    process.kill()
    process.wait()
    caplog.set_level(logging.WARNING, logger="aggregator")
    started = time.perf_counter()
    codes = [await call_as(stub, issuer_key, "greedy") for _ in range(4)]
    elapsed = time.perf_counter() - started
    assert codes == AFTER_REDIS_DIED[on_backend_error]
    assert elapsed < 2.0  # no call waited for the dead Redis beyond limits.timeout
    assert backend_errors(server) == 4  # every admission it did not decide
    logged = [r for r in caplog.records if getattr(r, "event", "") == "limit_backend_error"]
    assert len(logged) == 1  # once a minute, not once a call


async def test_a_stalled_redis_cannot_stall_the_loop(start_server, redis, issuer_key, tmp_path):
    """Redis paused (SIGSTOP: connections accepted, nothing answered): every admission gives
    up after limits.timeout, and the loop keeps turning meanwhile."""
    url, process = redis
    auth = quota_auth(tmp_path, issuer_key, rate_limit={"rate": 100, "burst": 100})
    server, stub = await start_server(None, auth, limits=limits(url, "allow"))
    assert await call_as(stub, issuer_key, "greedy") == OK  # connected while Redis answered
    process.send_signal(signal.SIGSTOP)
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    beating = asyncio.create_task(heartbeat())
    try:
        started = time.perf_counter()
        codes = await asyncio.gather(*(call_as(stub, issuer_key, "greedy") for _ in range(20)))
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        await beating
        process.send_signal(signal.SIGCONT)
    assert codes == [OK] * 20  # on_backend_error: allow
    assert elapsed < 3.0  # one timeout (250ms) and a second without Redis, not 20 timeouts
    assert max(gaps) < 0.2, f"the loop stalled for {max(gaps):.3f}s"
    assert backend_errors(server) == 20


def replica_config(
    tmp_path: Path, index: int, rest: RestUpstream, auth: dict[str, Any], url: str
) -> tuple[Path, int]:
    port = free_port()
    document = {
        "server": {"address": f"127.0.0.1:{port}", "metrics_address": "", "admin_address": ""},
        "upstreams": {"rest": {"kind": "http", "url": rest.url}},
        "auth": auth,
        "limits": limits(url, prefix="replicas"),
    }
    path = tmp_path / f"replica{index}.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path, port


RATE, BURST, OFFERED, SECONDS, REPLICAS = 20.0, 5, 60.0, 3.0, 2


@pytest.mark.slow
async def test_replicas_hold_a_callers_rate_together(rest, redis, issuer_key, tmp_path):
    """Two real server processes sharing one Redis; one caller sends 3x its rate to both for
    3 s: what they admit together stays within rate x seconds + burst (+ one per replica)."""
    url, _ = redis
    auth = quota_auth(tmp_path, issuer_key, rate_limit={"rate": RATE, "burst": BURST})
    configs = [replica_config(tmp_path, i, rest, auth, url) for i in range(REPLICAS)]
    async with (
        aggregator_process(*configs[0]),
        aggregator_process(*configs[1]),
        grpc.aio.insecure_channel(f"127.0.0.1:{configs[0][1]}") as first,
        grpc.aio.insecure_channel(f"127.0.0.1:{configs[1][1]}") as second,
    ):
        stubs = [pb_grpc.AggregatorStub(first), pb_grpc.AggregatorStub(second)]
        codes, elapsed = await hammer(stubs, issuer_key)
    admitted = codes.count(OK)
    assert set(codes) <= {OK, EXHAUSTED}
    bound = RATE * elapsed + BURST + REPLICAS
    print(f"admitted {admitted} of {len(codes)} in {elapsed:.2f}s; bound {bound:.1f}")
    assert admitted <= bound
    # And not per replica, where each would admit its own rate: the shared limit is used.
    assert admitted >= RATE * elapsed * 0.7


async def hammer(stubs: list[Any], key: rsa.RSAPrivateKey) -> tuple[list[grpc.StatusCode], float]:
    """OFFERED calls a second for SECONDS, alternating replicas, each started on time
    whether the ones before have ended or not (a bounded loop)."""
    metadata = bearer(token(key, subject="greedy"))
    request = pb.AggregateRequest(targets=[http("t", "/echo/x")])

    async def one(stub: Any) -> grpc.StatusCode:
        _, code, _, _ = await collect(stub.Aggregate(request, timeout=5, metadata=metadata))
        return code

    loop = asyncio.get_running_loop()
    started = loop.time()
    calls = []
    for index in range(int(OFFERED * SECONDS)):
        await asyncio.sleep(max(0.0, started + index / OFFERED - loop.time()))
        calls.append(asyncio.create_task(one(stubs[index % len(stubs)])))
    codes = await asyncio.gather(*calls)
    return list(codes), loop.time() - started
