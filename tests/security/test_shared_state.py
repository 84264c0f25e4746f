"""docs/security.md, shared state: one caller never gets an answer keyed on something it controls,
and
never affects others through the breaker or a coalesced call beyond what the upstream says.

Each attack runs against the real server and real upstreams on loopback: an attacker's call
first, then the victim's, which must get its own answer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from aggregator import tracing
from aggregator.config import CachePolicy, UpstreamConfig
from aggregator.policies.cache import Coalescer, cache_key, namespace
from aggregator.policies.deadline import Deadline
from aggregator.policies.limits import Bulkhead
from aggregator.request import GrpcRequest, HttpRequest
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http, rpc_target, wait_for
from tests.e2e.test_composition import joined, redis_server
from tests.e2e.test_resilience import circuit_state
from tests.upstreams import rest_upstream


async def aggregate(
    stub: Any, *targets: pb.Target, timeout: float = 5, metadata: Any = None
) -> list[pb.TargetResult]:
    results, code, _, _ = await collect(
        stub.Aggregate(
            pb.AggregateRequest(targets=list(targets)), timeout=timeout, metadata=metadata
        )
    )
    assert code == grpc.StatusCode.OK
    return results


async def one(stub: Any, target: pb.Target, **options: Any) -> pb.TargetResult:
    (result,) = await aggregate(stub, target, **options)
    return result


def cached(url: str, **cache: Any) -> dict[str, Any]:
    return {"kind": "http", "url": url, "cache": {"ttl": "30s", **cache}}


def echoed(result: pb.TargetResult) -> dict[str, Any]:
    assert result.outcome == pb.OUTCOME_OK, result.error
    return json.loads(result.body)  # type: ignore[no-any-return]


def timed(target: pb.Target, ms: int) -> pb.Target:
    target.timeout.FromMilliseconds(ms)
    return target


# Finding 3: cache keys. Each pair collided under the old key (fields joined with NULs, no
# lengths; tracing headers left out); the victim got the attacker's answer as a HIT.
FORGERIES = {
    "query value posing as a second query pair": (
        {"query": {"a": "1\0q:b=2"}},
        {"query": {"a": "1", "b": "2"}},
    ),
    "query value posing as a header": (
        {"query": {"z": "1\0h:accept=application/json"}},
        {"query": {"z": "1"}, "headers": {"Accept": "application/json"}},
    ),
    "body posing as a header": (
        {"body": b"h:x-role=user\0"},
        {"headers": {"X-Role": "user"}},
    ),
    "caller-set baggage": ({"headers": {"baggage": "role=admin"}}, {}),
    "caller-set tracestate": ({"headers": {"tracestate": "x=evil"}}, {}),
    "caller-set traceparent": (
        {"headers": {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}},
        {},
    ),
}


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_a_forged_request_does_not_plant_an_answer_for_another(start_server, rest, forgery):
    attacker_fields, victim_fields = FORGERIES[forgery]
    _, stub = await start_server(cached=cached(rest.url))
    # A body on GET is refused before anything is sent (docs/security.md); the others run and
    # are cached.
    attack = pb.AggregateRequest(
        targets=[http("attacker", "/echo", upstream="cached", **attacker_fields)]
    )
    _, code, _, _ = await collect(stub.Aggregate(attack, timeout=5))
    refused = "body" in attacker_fields
    assert code == (grpc.StatusCode.INVALID_ARGUMENT if refused else grpc.StatusCode.OK)
    victim = await one(stub, http("victim", "/echo", upstream="cached", **victim_fields))
    assert victim.cache == pb.CACHE_STATUS_MISS
    seen = echoed(victim)
    assert seen["query"] == victim_fields.get("query", {})
    assert seen["body"] == ""
    for name in ("baggage", "tracestate", "traceparent"):
        assert name not in {key.lower() for key in seen["headers"]}
    again = await one(stub, http("victim", "/echo", upstream="cached", **victim_fields))
    assert again.cache == pb.CACHE_STATUS_HIT  # the victim's own entry still serves it


async def test_tracestate_our_tracing_forwards_for_a_caller_is_keyed(start_server, rest):
    # With tracing on, the caller's tracestate metadata reaches the upstream through our own
    # propagation (the attempt span inherits it): the key covers it, the per-attempt
    # traceparent it does not.
    provider = TracerProvider()
    tracing.enable(provider)
    try:
        _, stub = await start_server(cached=cached(rest.url))
        parent = ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        attacker = (parent, ("tracestate", "x=evil"))
        planted = await one(stub, http("a", "/echo", upstream="cached"), metadata=attacker)
        assert echoed(planted)["headers"]["tracestate"] == "x=evil"
        victim = await one(stub, http("v", "/echo", upstream="cached"), metadata=(parent,))
        assert victim.cache == pb.CACHE_STATUS_MISS
        assert "tracestate" not in echoed(victim)["headers"]
        again = await one(stub, http("v", "/echo", upstream="cached"))
        assert again.cache == pb.CACHE_STATUS_HIT  # another trace altogether, still a hit
    finally:
        tracing.disable()
        provider.shutdown()


def test_keys_are_an_unambiguous_encoding_of_what_is_sent():
    space = b"n" * 32

    def key(**fields: Any) -> bytes:
        request = {"method": "GET", "path": "/p", "query": (), "headers": (), "body": None}
        return cache_key(space, HttpRequest(**{**request, **fields}))

    distinct = [
        key(),
        key(body=b""),
        key(query=(("a", "1\0q:b=2"),)),
        key(query=(("a", "1"), ("b", "2"))),
        key(query=(("a", "1"),), headers=(("b", "2"),)),
        key(headers=(("a", "1"), ("b", "2"))),
        key(headers=(("a", "1b2"),)),
        key(headers=(("traceparent", "x"),)),
        key(path="/p\0GET"),
        cache_key(space, GrpcRequest("/s.S/M", b"", ())),
        cache_key(space, GrpcRequest("/s.S/M", b"\0", ())),
        cache_key(space, GrpcRequest("/s.S/M", b"", (("a", "1"),))),
        cache_key(b"m" * 32, HttpRequest("GET", "/p", (), (), None)),
    ]
    assert len(set(distinct)) == len(distinct)
    assert key(headers=(("X-Request-Id", "mine"),)) == key()  # we send our own id instead
    trace = (("traceparent", "00-a-b-01"), ("baggage", "k=v"))
    assert cache_key(space, HttpRequest("GET", "/p", (), (), None), trace[:1]) == key()
    assert cache_key(space, HttpRequest("GET", "/p", (), (), None), trace) != key()


def test_the_namespace_covers_the_upstreams_address_tls_and_key_prefix():
    policy = CachePolicy(ttl=1.0)
    base = UpstreamConfig(name="u", kind="http", url="http://a")
    spaces = {
        namespace(base, policy),
        namespace(UpstreamConfig(name="u", kind="http", url="http://b"), policy),
        namespace(UpstreamConfig(name="v", kind="http", url="http://a"), policy),
        namespace(base, CachePolicy(ttl=1.0, key_prefix="shop")),
    }
    assert len(spaces) == 4
    assert namespace(base, CachePolicy(ttl=9.0)) == namespace(base, policy)


async def test_deployments_sharing_a_redis_get_their_own_upstreams_answers(start_server, rest):
    with redis_server() as redis_url:
        async with rest_upstream() as other:
            shared = {"backend": "redis", "redis_url": redis_url}
            _, first = await start_server(cached=cached(rest.url, **shared))
            _, second = await start_server(cached=cached(other.url, **shared))
            _, prefixed = await start_server(cached=cached(rest.url, key_prefix="b", **shared))
            _, replica = await start_server(cached=cached(rest.url, **shared))
            target = http("a", "/count/k", upstream="cached")
            assert (await one(first, target)).cache == pb.CACHE_STATUS_MISS
            # Same upstream name, another address: its own upstream's answer.
            elsewhere = await one(second, target)
            assert elsewhere.cache == pb.CACHE_STATUS_MISS
            assert other.recorder.counts["k"] == 1
            # Same address, another key_prefix: kept apart on purpose.
            assert (await one(prefixed, target)).cache == pb.CACHE_STATUS_MISS
            # A replica of the first deployment shares its entries, as before.
            assert (await one(replica, target)).cache == pb.CACHE_STATUS_HIT
            assert rest.recorder.counts["k"] == 2


# Finding 4: the breaker counts what the upstream says, not a caller's own limits.


async def test_callers_own_short_timeouts_never_open_the_breaker(start_server, rest, rpc):
    breaker = {"fail_max": 3, "reset_timeout": "30s"}
    server, stub = await start_server(
        guarded={"kind": "http", "url": rest.url, "circuit_breaker": breaker},
        guarded_rpc={"kind": "grpc", "address": rpc.address, "circuit_breaker": breaker},
    )
    tiny = [timed(http(f"h{i}", "/delay/100", upstream="guarded"), 1) for i in range(10)]
    tiny += [
        timed(rpc_target(f"g{i}", "Delay", b"100", upstream="guarded_rpc"), 1) for i in range(10)
    ]
    results = await aggregate(stub, *tiny)
    assert {r.outcome for r in results} == {pb.OUTCOME_TIMEOUT}
    # The call's own short deadline says no more than a target timeout does.
    for _ in range(4):
        await collect(
            stub.Aggregate(
                pb.AggregateRequest(
                    targets=[
                        http("h", "/delay/300", upstream="guarded"),
                        rpc_target("g", "Delay", b"300", upstream="guarded_rpc"),
                    ]
                ),
                timeout=0.1,
            )
        )
    assert circuit_state(server, "guarded") == 0
    assert circuit_state(server, "guarded_rpc") == 0
    others = await aggregate(
        stub,
        http("ok", "/delay/1", upstream="guarded"),
        rpc_target("ok_rpc", "Echo", b"x", upstream="guarded_rpc"),
    )
    assert [r.outcome for r in others] == [pb.OUTCOME_OK, pb.OUTCOME_OK]


async def test_the_upstreams_own_timeout_still_opens_the_breaker(start_server, rest):
    breaker = {"fail_max": 3, "reset_timeout": "30s"}
    server, stub = await start_server(
        guarded={"kind": "http", "url": rest.url, "timeout": "20ms", "circuit_breaker": breaker}
    )
    for i in range(3):
        result = await one(stub, http(f"t{i}", "/delay/200", upstream="guarded"))
        assert "upstream timeout 20ms" in result.error
    assert circuit_state(server, "guarded") == 2


# Finding 5: a coalesced call runs under the latest deadline of its waiters.


@pytest.mark.parametrize("short_first", [True, False], ids=["short-first", "long-first"])
async def test_a_short_waiter_does_not_cut_a_shared_call_short(start_server, rest, short_first):
    # The upstream answers when the test opens its gate: after the short waiter has gone.
    server, stub = await start_server(cached=cached(rest.url))
    short = timed(http("short", "/gate/k", upstream="cached"), 400)
    long = http("long", "/gate/k", upstream="cached")
    first, second = (short, long) if short_first else (long, short)
    first_call = asyncio.create_task(one(stub, first))
    await wait_for(rest.recorder.arrived)  # the shared call is in flight
    second_call = asyncio.create_task(one(stub, second))
    await joined(server.endpoints["cached"].coalescer, 2)
    short_call, long_call = (first_call, second_call) if short_first else (second_call, first_call)
    left = await short_call
    assert left.outcome == pb.OUTCOME_TIMEOUT
    assert "target timeout 400ms" in left.error
    assert left.latency.ToMilliseconds() < 1000  # at its own time, not the shared call's
    assert not long_call.done()
    rest.recorder.gate.set()
    stayed = await long_call
    assert echoed(stayed) == {"n": 1}
    assert stayed.cache == pb.CACHE_STATUS_MISS
    assert rest.recorder.counts["k"] == 1
    assert rest.recorder.cancelled.empty()


async def test_the_shared_call_is_cancelled_when_every_waiter_has_left(start_server, rest):
    _, stub = await start_server(cached=cached(rest.url))
    first = asyncio.create_task(one(stub, timed(http("a", "/hang", upstream="cached"), 100)))
    await wait_for(rest.recorder.hanging)
    second = await one(stub, timed(http("b", "/hang", upstream="cached"), 150))
    assert (await first).outcome == second.outcome == pb.OUTCOME_TIMEOUT
    await wait_for(rest.recorder.cancelled)  # the upstream saw the call go
    assert len(rest.recorder.requests) == 1


async def test_a_bulkhead_wait_follows_a_deadline_that_moves_later():
    loop = asyncio.get_running_loop()
    bulkhead = Bulkhead("b", 1, "full")
    await bulkhead.acquire(loop.time() + 5)
    deadline = Deadline(loop.time() + 0.05, "first")
    waiter = asyncio.create_task(bulkhead.acquire(deadline))
    deadline.extend(Deadline(loop.time() + 5, "later"))
    await asyncio.sleep(0.1)  # the time under test: past the first deadline
    assert not waiter.done()
    assert repr(bulkhead) == "<Bulkhead b [1/1 in flight, 1 waiting]>"
    bulkhead.release()
    await waiter
    assert repr(bulkhead) == "<Bulkhead b [1/1 in flight, 0 waiting]>"


async def test_a_newcomer_never_joins_a_shared_call_being_cancelled():
    # The last waiter left: the shared call is cancelled and, while it cleans up (closing a
    # connection yields), an identical request arrives. It must start its own call, not get
    # a CancelledError it never asked for.
    coalescer = Coalescer()
    loop = asyncio.get_running_loop()
    cleaning = asyncio.Event()

    async def call(deadline: Deadline) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await asyncio.sleep(0)  # cleanup that yields
            await asyncio.sleep(0)
            raise
        return "never"

    async def answer(deadline: Deadline) -> str:
        return "fresh"

    first = asyncio.create_task(coalescer.run(b"k", Deadline(loop.time() + 5, "t"), call))
    await asyncio.sleep(0)
    first.cancel()
    await cleaning.wait()
    result, joined = await coalescer.run(b"k", Deadline(loop.time() + 5, "t"), answer)
    assert (result, joined) == ("fresh", False)
    with pytest.raises(asyncio.CancelledError):
        await first
