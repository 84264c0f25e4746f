"""Limits, each with a clear error: request message size, body size per target, header count
and size, and the global cap on upstream calls in flight (server.max_upstream_inflight)."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import duration_pb2

from aggregator.config import config_from_mapping
from aggregator.errors import MAX_MESSAGE_SIZE, MAX_PROBLEMS_SIZE, status_message, wire_size
from aggregator.policies.limits import Bulkhead
from aggregator.request import GrpcRequest
from aggregator.security.outbound import target_problems
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http, rpc_target


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


async def aggregate(stub, *targets: pb.Target, timeout: float = 5):
    return await collect(
        stub.Aggregate(pb.AggregateRequest(targets=list(targets)), timeout=timeout)
    )


def nothing_sent(rest, rpc) -> bool:
    return rest.recorder.requests == [] and rpc.recorder.requests == []


async def test_a_request_message_over_max_request_bytes_is_refused_by_grpc(start_server, rest, rpc):
    _, stub = await start_server(server={"max_request_bytes": 2048})
    _, code, details, _ = await aggregate(stub, http("big", "/echo", body=b"x" * 4096))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details
    assert nothing_sent(rest, rpc)


async def test_bodies_over_an_upstreams_max_request_bytes_are_invalid(start_server, rest, rpc):
    _, stub = await start_server(
        small={"kind": "http", "url": rest.url, "max_request_bytes": 1000},
        tiny={"kind": "grpc", "address": rpc.address, "max_request_bytes": 10},
    )
    _, code, details, _ = await aggregate(
        stub,
        http("fits", "/echo", upstream="small", method="POST", body=b"x" * 1000),
        http("big", "/echo", upstream="small", method="POST", body=b"x" * 1001),
        rpc_target("message", "Echo", b"y" * 11, upstream="tiny"),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.split("; ") == [
        "target 'big': http.body: 1001 bytes exceed upstreams.small.max_request_bytes (1000)",
        "target 'message': grpc.request: 11 bytes exceed upstreams.tiny.max_request_bytes (10)",
    ]
    assert nothing_sent(rest, rpc)


async def test_header_count_and_size_are_limited_per_upstream(start_server, rest, rpc):
    _, stub = await start_server(
        strict={"kind": "http", "url": rest.url, "max_headers": 2, "max_header_bytes": 64},
    )
    _, code, details, _ = await aggregate(
        stub,
        http("many", "/echo", upstream="strict", headers={"a": "1", "b": "2", "c": "3"}),
        http("long", "/echo", upstream="strict", headers={"x-long": "v" * 100}),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.split("; ") == [
        "target 'many': http.headers: 3 entries exceed upstreams.strict.max_headers (2)",
        "target 'long': http.headers: 106 bytes of names and values exceed "
        "upstreams.strict.max_header_bytes (64)",
    ]
    assert nothing_sent(rest, rpc)


async def test_forwarded_metadata_counts_against_the_header_limits(start_server, rest, rpc):
    _, stub = await start_server(
        strict={
            "kind": "http",
            "url": rest.url,
            "forward_headers": ["authorization"],
            "max_header_bytes": 32,
        },
    )
    call = stub.Aggregate(
        pb.AggregateRequest(targets=[http("a", "/echo", upstream="strict")]),
        timeout=5,
        metadata=(("authorization", "Bearer " + "t" * 64),),
    )
    _, code, details, _ = await collect(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceed upstreams.strict.max_header_bytes (32)" in details
    assert nothing_sent(rest, rpc)


async def test_upstream_calls_beyond_the_global_cap_wait_for_a_slot(start_server, rest):
    aggregator, stub = await start_server(server={"max_upstream_inflight": 1})
    results, code, _, _ = await aggregate(
        stub, http("a", "/delay/50"), http("b", "/delay/50"), http("c", "/delay/50")
    )
    assert code == grpc.StatusCode.OK
    assert [r.outcome for r in results] == [pb.OUTCOME_OK] * 3
    assert rest.recorder.max_inflight == 1
    assert (
        repr(aggregator.upstream_inflight) == "<Bulkhead all upstreams [0/1 in flight, 0 waiting]>"
    )


async def test_a_call_that_cannot_get_a_slot_in_time_is_rejected(start_server, rest, rpc):
    _, stub = await start_server(server={"max_upstream_inflight": 1})
    results, code, _, _ = await aggregate(
        stub,
        http("holder", "/hang", timeout=seconds(1)),
        rpc_target("waiter", "Echo", b"x", timeout=seconds(0.2)),
    )
    by_id = {r.id: r for r in results}
    assert code == grpc.StatusCode.OK
    assert by_id["waiter"].outcome == pb.OUTCOME_REJECTED
    assert by_id["waiter"].error == (
        "1 upstream calls in flight (server.max_upstream_inflight) and none finished in time"
    )
    assert by_id["holder"].outcome == pb.OUTCOME_TIMEOUT
    assert rpc.recorder.requests == []


async def test_a_cancelled_waiter_gives_its_place_back():
    cap = Bulkhead("all", 1, "full")
    now = asyncio.get_running_loop().time()
    await cap.acquire(now + 1.0)
    waiter = asyncio.create_task(cap.acquire(now + 10.0))
    await asyncio.sleep(0)
    assert repr(cap) == "<Bulkhead all [1/1 in flight, 1 waiting]>"
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    cap.release()
    assert repr(cap) == "<Bulkhead all [0/1 in flight, 0 waiting]>"
    await cap.acquire(now + 0.1)
    assert cap.inflight == 1


def test_target_problems_is_a_pure_check_of_a_final_request():
    config = config_from_mapping(
        {
            "upstreams": {
                "prices": {
                    "kind": "grpc",
                    "address": "127.0.0.1:1",
                    "allowed_methods": ["/shop.Prices/*"],
                    "max_headers": 1,
                }
            }
        }
    )
    upstream = config.upstreams["prices"]
    fine = GrpcRequest(method="/shop.Prices/Get", request=b"", metadata=(("a", "1"),))
    assert target_problems(upstream, fine, "p") == []
    wrong = GrpcRequest(method="/shop.Admin/Drop", request=b"", metadata=(("a", "1"), ("b", "2")))
    assert list(map(str, target_problems(upstream, wrong, "p"))) == [
        "target 'p': grpc.method: is not in upstreams.prices.allowed_methods (/shop.Prices/*)",
        "target 'p': grpc.metadata: 2 entries exceed upstreams.prices.max_headers (1)",
    ]


async def test_a_request_with_many_problems_still_ends_invalid_argument(start_server, rest, rpc):
    _, stub = await start_server()
    targets = [http(f"target-{i:03d}-" + "x" * 40, "no-slash/" + "p" * 80) for i in range(100)]
    _, code, details, _ = await aggregate(stub, *targets)
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED: metadata too big
    assert details.startswith("target 'target-000-")
    assert details.endswith(" more problems")
    assert wire_size(details) <= MAX_PROBLEMS_SIZE
    assert nothing_sent(rest, rpc)


def test_status_messages_are_cut_to_fit_beside_the_trailers():
    assert status_message("short") == "short"
    cut = status_message("é" * 5000)
    assert cut.endswith(" ... (cut)")
    assert wire_size(cut) <= MAX_MESSAGE_SIZE
