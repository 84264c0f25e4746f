"""The server's answer takes time at most linear in the request's bytes (issue 23, "Build with
it: an adversarial harness"): for each shape, four sizes, each double the last, answered by the
real server (INVALID_ARGUMENT, or OK against a fast upstream). Memory is bounded per call by the
watch (RSS_SLACK + RSS_PER_BYTE x the bytes read), at every size.

The bound is generous: the median time may grow at most GROWTH_PER_DOUBLING times per doubling
(linear work doubles; quadratic work quadruples). A median under FLOOR counts as FLOOR: below
it a time is mostly the machine's noise. A time excludes the loop thread's wait for a CPU (as
the watch's stalls do). The sizes keep the largest request within the loop-lag bound today;
the known findings' sizes are in test_known_findings.py.
"""

from __future__ import annotations

import gc
import itertools
import json
import statistics
from collections.abc import Callable

import pytest
from google.protobuf import struct_pb2

from aggregator.v1 import aggregator_pb2 as pb
from tests.adversarial.conftest import Adversary
from tests.conftest import http

GROWTH_PER_DOUBLING = 3.0
FLOOR = 0.010  # seconds
RUNS = 5
DOUBLINGS = 3  # four sizes


def past_max_targets(n: int) -> pb.AggregateRequest:
    return pb.AggregateRequest(targets=[http(f"t{i}", "/echo/x") for i in range(n)])


def wide_http_json(n: int) -> pb.AggregateRequest:
    body = struct_pb2.Value()
    body.struct_value.update({"items": [{"k": i, "v": "w"} for i in range(n)]})
    return pb.AggregateRequest(targets=[http("j", "/echo", method="POST", json=body)])


def wide_grpc_json(n: int) -> pb.AggregateRequest:
    call = pb.GrpcCall(upstream="shop", method="/shop.v1.Catalog/Echo")
    attributes = call.json.struct_value.fields["attributes"].struct_value
    attributes.update({f"k{i}": [i, "v"] for i in range(n)})
    return pb.AggregateRequest(targets=[pb.Target(id="g", grpc=call)])


def past_max_headers(n: int) -> pb.AggregateRequest:
    headers = {f"X-H{i:06}": "value" for i in range(n)}
    return pb.AggregateRequest(targets=[http("h", "/echo/h", headers=headers)])


def past_max_references(n: int) -> pb.AggregateRequest:
    body = struct_pb2.Value(string_value="{{d.s}}" * n)
    user = http("u", "/echo", method="POST", json=body, depends_on=["d"])
    return pb.AggregateRequest(targets=[http("d", "/echo/d"), user])


def odd_long_path(n: int) -> pb.AggregateRequest:
    return pb.AggregateRequest(targets=[http("p", "/echo/" + "%2e%2e/..;/" * n, upstream="ruled")])


def fan_in(n: int) -> pb.AggregateRequest:
    """n dependents reading one dependency's value, run against the fast upstream."""
    dependency = http("d", "/json", query={"body": json.dumps({"s": "v" * 64})})
    readers = [http(f"r{i}", "/echo/{{d.s}}/{{d.s}}", depends_on=["d"]) for i in range(n)]
    return pb.AggregateRequest(targets=[dependency, *readers])


SHAPES: dict[str, tuple[Callable[[int], pb.AggregateRequest], int]] = {
    "past-max-targets": (past_max_targets, 150),
    "wide-http-json": (wide_http_json, 200),
    "wide-grpc-json": (wide_grpc_json, 200),
    "past-max-headers": (past_max_headers, 1000),
    "past-max-references": (past_max_references, 1000),
    "odd-long-path": (odd_long_path, 2000),
    "fan-in": (fan_in, 8),
}


async def median_times(adversary: Adversary, requests: list[pb.AggregateRequest]) -> list[float]:
    """The median answer time of each request, measured in turns so that a change in the
    machine's load touches all sizes alike. The garbage collector is off meanwhile: a
    collection costs in proportion to all the test process holds, not to the request."""
    times: list[list[float]] = [[] for _ in requests]
    gc.collect()
    gc.disable()
    try:
        for _ in range(RUNS):
            for measured, request in zip(times, requests, strict=True):
                measured.append(await adversary.timed(request))
    finally:
        gc.enable()
    return [statistics.median(measured) for measured in times]


@pytest.mark.parametrize("shape", SHAPES)
async def test_answer_time_grows_at_most_linearly_in_request_bytes(
    adversary: Adversary, shape: str
) -> None:
    make, size = SHAPES[shape]
    requests = [make(size * 2**step) for step in range(DOUBLINGS + 1)]
    sizes = [request.ByteSize() for request in requests]
    for smaller, larger in itertools.pairwise(sizes):
        assert 1.7 < larger / smaller < 2.3, sizes
    times = await median_times(adversary, requests)
    shown = ", ".join(f"{b} B: {t * 1000:.1f} ms" for b, t in zip(sizes, times, strict=True))
    for small, large in itertools.pairwise(times):
        assert large / max(small, FLOOR) <= GROWTH_PER_DOUBLING, shown
