"""An upstream is a fleet (docs/fleet.md): endpoints, balancing, outlier ejection, adaptive limits.

Real upstream servers on loopback addresses (127.0.0.2 and 127.0.0.3 are loopback on Linux),
the real aggregator in front of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from aggregator.config import UpstreamConfig, config_from_mapping
from aggregator.errors import TargetFailure
from aggregator.lifecycle import AggregatorServer
from aggregator.metrics import Metrics
from aggregator.policies.endpoint import GuardedUpstream
from aggregator.policies.limits import Bulkhead, GradientLimit
from aggregator.request import HttpRequest
from aggregator.upstreams import Reply, open_upstream
from aggregator.upstreams.fleet import Fleet
from aggregator.v1 import aggregator_pb2 as pb
from tests.clocks import ManualClock
from tests.conftest import collect, http
from tests.upstreams import RestUpstream, refused_port, rest_upstream


@contextlib.asynccontextmanager
async def fleet_of(count: int) -> AsyncIterator[list[RestUpstream]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(rest_upstream()) for _ in range(count)]


def sample(server: AggregatorServer, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def calls(stub: Any, upstream: str, path: str, count: int, width: int = 10) -> list[Any]:
    """``count`` targets to ``upstream``, ``width`` to an aggregate; their results."""
    results = []
    for start in range(0, count, width):
        targets = [
            http(f"t{i}", path, upstream=upstream) for i in range(start, min(count, start + width))
        ]
        found, _, _, _ = await collect(stub.Aggregate(pb.AggregateRequest(targets=targets)))
        results.extend(found)
    return results


async def test_least_request_spreads_calls_over_every_endpoint(start_server):
    async with fleet_of(3) as fleet:
        server, stub = await start_server(
            many={"kind": "http", "url": [upstream.url for upstream in fleet]}
        )
        results = await calls(stub, "many", "/delay/5", 90)
        assert all(result.outcome == pb.OUTCOME_OK for result in results)
        shares = [len(upstream.recorder.requests) for upstream in fleet]
        assert sum(shares) == 90
        assert min(shares) >= 14, shares  # each at least 15% of 90
        assert sample(server, "aggregator_upstream_endpoints", upstream="many", state="active") == 3


async def test_round_robin_takes_endpoints_in_turn(start_server):
    async with fleet_of(3) as fleet:
        _, stub = await start_server(
            many={
                "kind": "http",
                "url": [upstream.url for upstream in fleet],
                "balancer": "round_robin",
            }
        )
        await calls(stub, "many", "/echo", 90)
        shares = [len(upstream.recorder.requests) for upstream in fleet]
        assert all(28 <= share <= 32 for share in shares), shares


async def test_a_refused_endpoint_is_ejected_then_readmitted(start_server, caplog):
    """A refused connect sent nothing: the call moves to the healthy endpoint at once, the
    refused one is ejected after its consecutive failures, and takes calls again after the
    ejection time. The breaker never opens for it."""
    caplog.set_level(logging.INFO, "aggregator.fleet")
    async with fleet_of(1) as (healthy,):
        dead = f"http://127.0.0.1:{refused_port()}"
        clock = ManualClock()
        server, stub = await start_server(
            clock=clock,
            pair={
                "kind": "http",
                "url": [healthy.url, dead],
                "outlier_detection": {"consecutive_failures": 3, "base_ejection_time": "300ms"},
                "circuit_breaker": {"fail_max": 2, "reset_timeout": "30s"},
            },
        )
        results = await calls(stub, "pair", "/echo", 40, width=1)
        assert all(result.outcome == pb.OUTCOME_OK for result in results)
        assert sample(server, "aggregator_endpoint_ejections_total", upstream="pair") == 1
        assert (
            sample(server, "aggregator_upstream_endpoints", upstream="pair", state="ejected") == 1
        )
        assert sample(server, "aggregator_circuit_state", upstream="pair") == 0
        assert "ejected for 0.3s after 3 failures in a row" in caplog.text
        assert dead.removeprefix("http://") in caplog.text  # logs name the address
        clock.advance(0.299)
        assert "takes calls again" not in caplog.text
        clock.advance(0.002)  # the fleet's clock, past the ejection time
        assert (
            sample(server, "aggregator_upstream_endpoints", upstream="pair", state="ejected") == 0
        )
        assert sample(server, "aggregator_upstream_endpoints", upstream="pair", state="active") == 2
        assert "takes calls again" in caplog.text
        exposed = generate_latest(server.metrics.registry).decode()
        assert "127.0.0.1" not in exposed  # no address is ever a label


async def test_a_failing_attempt_is_retried_on_another_endpoint(start_server):
    """One endpoint of two answers 503: with one retry every call ends OK, because the retry
    goes to the other endpoint; one bad endpoint does not open the upstream's breaker."""
    async with fleet_of(2) as (good, bad):
        bad.recorder.failing = True
        server, stub = await start_server(
            pair={
                "kind": "http",
                "url": [good.url, bad.url],
                "retry": {"attempts": 2, "backoff": "1ms", "max_backoff": "2ms", "budget": 1.0},
                "circuit_breaker": {"fail_max": 3, "reset_timeout": "30s"},
                "outlier_detection": {"consecutive_failures": 1000},
            }
        )
        results = await calls(stub, "pair", "/toggle/k", 30, width=5)
        assert [r.outcome for r in results] == [pb.OUTCOME_OK] * 30, [r.error for r in results]
        assert len(bad.recorder.requests) > 0
        assert sample(server, "aggregator_circuit_state", upstream="pair") == 0


async def test_a_failing_endpoint_alone_never_opens_the_breaker_but_all_failing_do(start_server):
    """Without retries, one endpoint of two answering 503 fails its share of calls (ejection
    is off here), several in a row at times: the breaker stays closed. Both failing open it."""
    async with fleet_of(2) as (first, second):
        first.recorder.failing = True
        server, stub = await start_server(
            pair={
                "kind": "http",
                "url": [first.url, second.url],
                "circuit_breaker": {"fail_max": 3, "reset_timeout": "30s"},
                "outlier_detection": {"consecutive_failures": 1000},
            }
        )
        results = await calls(stub, "pair", "/toggle/k", 60, width=1)
        assert pb.OUTCOME_CIRCUIT_OPEN not in {result.outcome for result in results}
        assert sample(server, "aggregator_circuit_state", upstream="pair") == 0
        second.recorder.failing = True
        await calls(stub, "pair", "/toggle/k", 8, width=1)
        assert sample(server, "aggregator_circuit_state", upstream="pair") == 2


async def test_a_name_resolves_to_every_address_of_localhost(start_server):
    """One real lookup: localhost, whose addresses may include ::1 where nothing listens
    (a refused connect moves on to the next endpoint): every call ends OK."""
    async with fleet_of(1) as (upstream,):
        by_name = upstream.url.replace("127.0.0.1", "localhost")
        server, stub = await start_server(named={"kind": "http", "url": by_name})
        results = await calls(stub, "named", "/echo", 20)
        assert all(result.outcome == pb.OUTCOME_OK for result in results)
        assert (
            sample(server, "aggregator_upstream_endpoints", upstream="named", state="active") >= 1
        )


class Names:
    """A resolver the test changes: name -> addresses, or an OSError to raise."""

    def __init__(self, answers: dict[str, Sequence[str] | OSError]) -> None:
        self.answers = answers
        self.lookups = asyncio.Queue[str]()

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.lookups.put_nowait(host)
        answer = self.answers[host]
        if isinstance(answer, OSError):
            raise answer
        return answer


def _config(url: str | list[str], **more: Any) -> UpstreamConfig:
    document = {"upstreams": {"svc": {"kind": "http", "url": url, **more}}}
    return config_from_mapping(document).upstreams["svc"]


GET = HttpRequest("GET", "/echo", (), (), None)


async def _through_policies(fleet: Fleet, timeout: float, request_id: str) -> Reply:
    """One call of GET through the upstream's policies (the public path), its failure raised."""
    config = _config("http://unused.test", timeout=f"{timeout * 1000:g}ms")
    metrics = Metrics(CollectorRegistry(), ["svc"]).upstreams["svc"]
    guarded = GuardedUpstream(fleet, config, metrics, Bulkhead("all", 100, "x"))
    deadline = asyncio.get_running_loop().time() + timeout
    answer = await guarded.call(
        GET, idempotent=True, deadline=deadline, deadline_reason="x", request_id=request_id
    )
    if isinstance(answer.result, TargetFailure):
        raise answer.result
    return answer.result


async def _spread(fleet: Fleet, count: int) -> None:
    for i in range(count):
        reply = await _through_policies(fleet, 2.0, f"r{i}")
        assert reply.ok


async def test_endpoints_follow_their_names_between_lookups(caplog):
    """A headless Service: one name, an address per pod. Pods come and go between lookups;
    a pod that left finishes its call in flight; a failed lookup keeps the last set."""
    caplog.set_level(logging.INFO, "aggregator.fleet")
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(rest_upstream("127.0.0.1"))
        port = first.port
        second = await stack.enter_async_context(rest_upstream("127.0.0.2", port))
        third = await stack.enter_async_context(rest_upstream("127.0.0.3", port))
        names = Names({"pods.test": ["127.0.0.1", "127.0.0.2"]})
        fleet = open_upstream(_config(f"http://pods.test:{port}"), resolver=names)
        assert isinstance(fleet, Fleet)
        try:
            await _spread(fleet, 20)
            assert first.recorder.requests
            assert second.recorder.requests
            assert not third.recorder.requests
            slow = asyncio.create_task(_slow_call_on(fleet, first))
            await asyncio.wait_for(first.recorder.arrived.get(), 5)
            names.answers["pods.test"] = ["127.0.0.2", "127.0.0.3"]
            await fleet.resolve()
            assert (await slow).ok  # the pod that left finished its call
            before = len(first.recorder.requests)
            await _spread(fleet, 20)
            assert len(first.recorder.requests) == before
            assert third.recorder.requests
            names.answers["pods.test"] = OSError("Name or service not known")
            await fleet.resolve()
            await fleet.resolve()
            await _spread(fleet, 4)  # the last good set stays
            assert caplog.text.count("looking up pods.test failed") == 1
        finally:
            await fleet.aclose()


async def _slow_call_on(fleet: Fleet, upstream: RestUpstream) -> Any:
    """A slow call pinned to ``upstream``'s endpoint."""
    member = next(m for m in fleet.members if m.address.startswith(upstream.host))
    others = [m for m in fleet.members if m is not member]
    chosen = await fleet.choose(others, asyncio.get_running_loop().time() + 5)
    assert chosen is member
    try:
        return await member.upstream.call(HttpRequest("GET", "/delay/200", (), (), None), 5, "s")
    finally:
        fleet.done(member, False)


async def test_names_are_looked_up_again_every_resolve_interval():
    async with fleet_of(1) as (upstream,):
        names = Names({"svc.test": ["127.0.0.1"]})
        config = _config(f"http://svc.test:{upstream.port}", resolve_interval="20ms")
        fleet = open_upstream(config, resolver=names)
        try:
            for _ in range(3):
                assert await asyncio.wait_for(names.lookups.get(), 5) == "svc.test"
        finally:
            await fleet.aclose()
        assert isinstance(fleet, Fleet)
        assert fleet._resolving is not None
        assert fleet._resolving.cancelled()  # the fleet's task ends with it


# Adaptive concurrency -----------------------------------------------------------------------


def test_the_gradient_limit_grows_on_flat_latency_and_falls_when_latency_follows_load():
    flat = Bulkhead("flat", 20, "")
    flat_limit = GradientLimit(flat, 200, lambda value: None)
    for _ in range(400):
        flat_limit.sample(0.010, flat_limit.limit)  # every slot used, same latency
    assert flat_limit.limit == 200
    loaded = Bulkhead("loaded", 20, "")
    loaded_limit = GradientLimit(loaded, 200, lambda value: None)
    for _ in range(400):
        loaded_limit.sample(0.002 * loaded_limit.limit, loaded_limit.limit)
    grown = loaded_limit.limit
    for _ in range(200):  # the upstream slows down fourfold under the same load
        loaded_limit.sample(0.008 * loaded_limit.limit, loaded_limit.limit)
    assert loaded_limit.limit < grown / 2
    assert loaded.limit == loaded_limit.limit


async def _load(stub: Any, upstream: str, path: str, rounds: int, width: int) -> list[Any]:
    results: list[Any] = []
    for _ in range(rounds):
        results.extend(await calls(stub, upstream, path, width, width=width))
    return results


async def _load_from_many(stub: Any, upstream: str, path: str, rounds: int, callers: int) -> None:
    """``rounds`` of ``callers`` calls at once, one target each: load from many callers."""
    for _ in range(rounds):
        await asyncio.gather(*(calls(stub, upstream, path, 1) for _ in range(callers)))


async def test_auto_limit_falls_under_load_dependent_latency_not_under_flat(start_server):
    async with fleet_of(2) as (loaded, flat):
        server, stub = await start_server(
            loaded={"kind": "http", "url": loaded.url, "max_concurrency": "auto"},
            flat={"kind": "http", "url": flat.url, "max_concurrency": "auto"},
            server={"address": "127.0.0.1:0", "metrics_address": "", "max_targets": 100},
        )
        assert sample(server, "aggregator_upstream_concurrency_limit", upstream="flat") == 20
        flat_results = await _load(stub, "flat", "/delay/20", 8, 60)
        assert all(result.outcome == pb.OUTCOME_OK for result in flat_results)
        flat_limit = sample(server, "aggregator_upstream_concurrency_limit", upstream="flat")
        assert flat_limit >= 60  # not throttled: grew to the offered load
        # Light load first: the latency it learns as normal is the unloaded one (a machine
        # stall then weighs on ten samples, not on the norm).
        await _load(stub, "loaded", "/loaded/5", 2, 10)
        # Many callers: one call lowers a shared limit once at most (issue 23, #14).
        await _load_from_many(stub, "loaded", "/loaded/5", 8, 60)
        loaded_limit = sample(server, "aggregator_upstream_concurrency_limit", upstream="loaded")
        assert loaded_limit < flat_limit * 0.75, (loaded_limit, flat_limit)
        assert loaded_limit < 60  # below the offered load: calls waited for slots
        assert sample(server, "aggregator_upstream_concurrency_limit", upstream="rest") == 100


def test_metrics_carry_no_address():
    metrics = Metrics(CollectorRegistry(), ["svc"])
    labels = metrics.upstreams["svc"]
    labels.endpoints_active.set(3)
    labels.ejections.inc()
    text = generate_latest(metrics.registry).decode()
    assert 'aggregator_upstream_endpoints{state="active",upstream="svc"} 3.0' in text
    assert 'aggregator_endpoint_ejections_total{upstream="svc"} 1.0' in text


@pytest.mark.parametrize("balancer", ["least_request", "round_robin"])
async def test_a_grpc_fleet_spreads_over_one_channel_per_endpoint(balancer):
    from tests.upstreams import grpc_upstream

    async with grpc_upstream() as one, grpc_upstream() as two:
        document = {
            "server": {"address": "127.0.0.1:0", "metrics_address": ""},
            "upstreams": {
                "rpc": {"kind": "grpc", "address": [one.address, two.address], "balancer": balancer}
            },
        }
        server = AggregatorServer(config_from_mapping(document))
        port = await server.start()
        try:
            import grpc

            from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
            from tests.conftest import rpc_target

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.AggregatorStub(channel)
                for _ in range(4):
                    targets = [rpc_target(f"t{i}", "Echo", b"x") for i in range(10)]
                    request = pb.AggregateRequest(targets=targets)
                    results, _, _, _ = await collect(stub.Aggregate(request))
                    assert all(r.outcome == pb.OUTCOME_OK for r in results), results
        finally:
            await server.drain()
        assert len(one.recorder.requests) >= 8
        assert len(two.recorder.requests) >= 8


async def test_a_hedge_goes_to_another_endpoint_than_the_slow_attempt(start_server):
    """One endpoint of two holds every call (its gate stays shut): the hedge, sent after
    20 ms, goes to the other endpoint and answers; never to the one already holding it."""
    async with fleet_of(2) as (stuck, quick):
        quick.recorder.gate.set()
        _, stub = await start_server(
            pair={
                "kind": "http",
                "url": [stuck.url, quick.url],
                "hedge": {"delay": "20ms"},
                "timeout": "1s",
                "balancer": "round_robin",
            }
        )
        results = await calls(stub, "pair", "/gate/k", 20, width=1)
        assert [r.outcome for r in results] == [pb.OUTCOME_OK] * 20, [r.error for r in results]
        assert stuck.recorder.counts.get("k", 0) == 10  # round_robin: every other first attempt


class _Idle:
    """An endpoint's upstream that is never called (ejection arithmetic only)."""

    name = "idle"

    async def call(self, request: Any, timeout: float, request_id: str) -> Any:
        raise AssertionError("not called")

    async def aclose(self) -> None:
        return None


def _literal_fleet(count: int, **outlier: Any) -> Fleet:
    urls = [f"http://10.0.0.{i}:80" for i in range(1, count + 1)]
    config = _config(urls, outlier_detection=outlier) if outlier else _config(urls)
    return Fleet(config, lambda entry, address: _Idle())


def _fail(fleet: Fleet, member: Any, times: int) -> None:
    for _ in range(times):
        member.outstanding += 1
        fleet.done(member, True)


async def test_ejection_lasts_longer_each_time_within_ten_minutes_and_is_capped_in_number():
    fleet = _literal_fleet(4, consecutive_failures=2, base_ejection_time="200s")
    first, second, third, _ = fleet.members
    loop = asyncio.get_running_loop()
    _fail(fleet, first, 2)
    assert 199 < first.ejected_until - loop.time() <= 200
    fleet._readmit(first)
    _fail(fleet, first, 2)
    assert 399 < first.ejected_until - loop.time() <= 400  # base x 2
    fleet._readmit(first)
    _fail(fleet, first, 2)
    fleet._readmit(first)
    _fail(fleet, first, 2)
    assert first.ejections == 4
    assert first.ejected_until - loop.time() <= 600  # 800 s capped at 10 minutes
    _fail(fleet, second, 2)
    _fail(fleet, third, 2)  # 50% of 4: the third is not ejected
    assert [bool(m.ejected_until) for m in fleet.members] == [True, True, False, False]
    await fleet.aclose()


async def test_one_of_two_may_always_be_ejected():
    fleet = _literal_fleet(2, consecutive_failures=1, max_ejection_percent=10)
    first, second = fleet.members
    _fail(fleet, first, 1)
    _fail(fleet, second, 1)
    assert [bool(m.ejected_until) for m in fleet.members] == [True, False]
    await fleet.aclose()


async def test_a_caller_timeout_or_cancellation_never_counts_against_an_endpoint():
    fleet = _literal_fleet(2, consecutive_failures=1)
    first, _ = fleet.members
    for _ in range(5):
        first.outstanding += 1
        fleet.done(first, None)  # what a caller's timeout or a cancellation records
    assert not first.ejected_until
    assert first.outstanding == 0
    await fleet.aclose()


async def test_a_resized_bulkhead_hands_new_slots_to_waiters_and_keeps_a_smaller_limit():
    bulkhead = Bulkhead("b", 1, "refused")
    assert bulkhead.try_acquire()
    loop = asyncio.get_running_loop()
    waiters = [asyncio.create_task(bulkhead.acquire(loop.time() + 5)) for _ in range(2)]
    await asyncio.sleep(0)
    bulkhead.resize(3)
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert bulkhead.inflight == 3
    bulkhead.resize(1)
    late = asyncio.create_task(bulkhead.acquire(loop.time() + 5))
    await asyncio.sleep(0)
    bulkhead.release()
    bulkhead.release()  # 3 -> 1 in flight: over the limit, nothing handed on
    assert not late.done()
    bulkhead.release()  # now the slot goes to the waiter
    await asyncio.wait_for(late, 5)
    assert bulkhead.inflight == 1


@pytest.mark.parametrize("dead", [False, True])
async def test_a_grpc_name_resolves_to_every_address_of_localhost(dead):
    """grpc's own resolver tried every address of a name; a fleet's endpoint per address must
    do no worse: a connect refused on one (::1, where nothing listens; here a refused port
    beside the name) moves the call to the next endpoint."""
    import grpc

    from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
    from tests.conftest import rpc_target
    from tests.upstreams import grpc_upstream

    async with grpc_upstream() as upstream:
        document = {
            "server": {"address": "127.0.0.1:0", "metrics_address": ""},
            "upstreams": {
                "rpc": {
                    "kind": "grpc",
                    "address": [f"localhost:{upstream.port}"]
                    + ([f"127.0.0.1:{refused_port()}"] if dead else []),
                    "balancer": "round_robin",
                }
            },
        }
        server = AggregatorServer(config_from_mapping(document))
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.AggregatorStub(channel)
                for _ in range(3):
                    targets = [rpc_target(f"t{i}", "Echo", b"x") for i in range(5)]
                    request = pb.AggregateRequest(targets=targets)
                    results, _, _, _ = await collect(stub.Aggregate(request))
                    assert all(r.outcome == pb.OUTCOME_OK for r in results), results
        finally:
            await server.drain()


async def test_a_name_that_never_resolved_fails_calls_within_their_time_then_serves():
    async with fleet_of(1) as (upstream,):
        names = Names({"late.test": OSError("Name or service not known")})
        fleet = open_upstream(_config(f"http://late.test:{upstream.port}"), resolver=names)
        assert isinstance(fleet, Fleet)
        try:
            with pytest.raises(TargetFailure, match=r"has no endpoints yet: late\.test"):
                await _through_policies(fleet, 0.2, "r")
            names.answers["late.test"] = ["127.0.0.1"]
            await fleet.resolve()
            await _spread(fleet, 2)
        finally:
            await fleet.aclose()


async def test_a_grpc_fleet_serves_json_targets_through_an_endpoints_reflection(start_server):
    """A gRPC fleet's descriptors come from the reflection of one of its endpoints."""
    import tempfile
    from pathlib import Path

    from tests.e2e.test_grpc_json import PRODUCT_JSON, as_dict, shop
    from tests.typed_upstreams import catalog_upstream, compile_descriptor_set

    with tempfile.TemporaryDirectory() as directory:
        compiled = compile_descriptor_set(Path(directory) / "shop.pb").read_bytes()
    async with catalog_upstream(compiled) as one, catalog_upstream(compiled) as two:
        addresses = [f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"]
        _, stub = await start_server(shop={"kind": "grpc", "address": addresses})
        targets = [shop(f"p{i}", "GetProduct", {"sku": "A-1"}, decode_json=True) for i in range(6)]
        results, _, _, _ = await collect(stub.Aggregate(pb.AggregateRequest(targets=targets)))
        assert [r.outcome for r in results] == [pb.OUTCOME_OK] * 6, [r.error for r in results]
        assert all(as_dict(result.json) == PRODUCT_JSON for result in results)
