"""docs/api.md: measurements are exact, on uvloop too, and a target cut short keeps its times."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from aggregator.logs import JsonFormatter
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import aggregator_process, collect, http
from tests.upstreams import RestUpstream, free_port

MS = 1_000_000  # nanoseconds


def _whole_ms(nanos: int) -> bool:
    """Within a nanosecond of a whole millisecond: what a millisecond clock gives, through a
    float (0.003 s became 2999999 ns)."""
    return min(nanos % MS, MS - nanos % MS) <= 1


def _fits(result: pb.TargetResult, trailers: dict[str, Any]) -> bool:
    """start_offset + latency within the aggregate's elapsed time (shown to the microsecond)."""
    elapsed = round(float(trailers["x-aggregate-elapsed-ms"]) * MS)
    ended = result.start_offset.ToNanoseconds() + result.latency.ToNanoseconds()
    return ended <= elapsed + 500


@pytest.fixture
async def uvloop_server(
    tmp_path, rest: RestUpstream
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """`aggregator serve` on uvloop, logging JSON lines."""
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
server:
  address: "127.0.0.1:{port}"
  metrics_address: ""
  admin_address: ""
  event_loop: uvloop
  log_format: json
upstreams:
  rest: {{kind: http, url: "{rest.url}"}}
"""
    )
    async with aggregator_process(config, port) as process:
        yield process, port


async def _log_lines(process: asyncio.subprocess.Process, prefix: str, count: int) -> list[Any]:
    """The next ``count`` aggregate log lines whose request id starts with ``prefix``."""
    assert process.stdout is not None
    lines: list[Any] = []
    async with asyncio.timeout(10):
        while len(lines) < count:
            text = await process.stdout.readline()
            assert text, "the server's log ended"
            line = json.loads(text)
            if str(line.get("request_id", "")).startswith(prefix):
                lines.append(line)
    return lines


async def test_on_uvloop_times_are_not_whole_milliseconds_and_fit_in_the_elapsed_time(
    uvloop_server,
):
    process, port = uvloop_server
    request = pb.AggregateRequest(targets=[http(f"t{i}", "/delay/0") for i in range(30)])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AggregatorStub(channel)
        calls = [
            await collect(stub.Aggregate(request, timeout=10, metadata=(("x-request-id", rid),)))
            for rid in ("e0", "e1", "e2")
        ]
    spans = []
    for results, code, _, trailers in calls:
        assert code == grpc.StatusCode.OK
        assert len(results) == 30
        assert all(_fits(result, trailers) for result in results)
        spans += [r.start_offset.ToNanoseconds() for r in results]
        spans += [r.latency.ToNanoseconds() for r in results]
    assert sum(map(_whole_ms, spans)) < len(spans) / 10, spans
    elapsed = [float(trailers["x-aggregate-elapsed-ms"]) for *_, trailers in calls]
    assert not all(value == round(value) for value in elapsed), elapsed
    lines = await _log_lines(process, "e", 3)
    assert [(line["targets"], line["results"]) for line in lines] == [(30, 30)] * 3
    assert all(line["elapsed_ms"] >= line["overhead_ms"] >= 0 for line in lines)
    logged = [line[key] for line in lines for key in ("elapsed_ms", "overhead_ms")]
    assert not all(value == round(value) for value in logged), logged


@pytest.fixture
def log_lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="aggregator")
    return caplog


def _logged(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    [record] = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
    line: dict[str, Any] = json.loads(JsonFormatter().format(record))
    return line


async def test_a_target_cut_by_the_deadline_keeps_its_start_and_ran_until_the_cut(
    start_server, log_lines
):
    aggregator, stub = await start_server()
    request = pb.AggregateRequest(targets=[http("quick", "/delay/1"), http("stuck", "/hang")])
    metadata = (("x-request-id", "cut-by-deadline"),)
    results, code, _, trailers = await collect(
        stub.Aggregate(request, timeout=0.4, metadata=metadata)
    )
    assert code == grpc.StatusCode.OK
    stuck = {result.id: result for result in results}["stuck"]
    assert stuck.outcome == pb.OUTCOME_TIMEOUT
    # Started with the call; stopped at the budget minus the margin (400 - 20 ms).
    assert stuck.start_offset.ToNanoseconds() < 50 * MS
    assert 300 * MS <= stuck.latency.ToNanoseconds() <= 400 * MS
    assert all(_fits(result, trailers) for result in results)
    # Waiting for the deadline is not overhead: the log and the histogram get only the rest.
    line = _logged(log_lines, "cut-by-deadline")
    assert line["slowest"] == "stuck"
    assert line["overhead_ms"] < 50
    registry = aggregator.metrics.registry
    assert registry.get_sample_value("aggregator_overhead_seconds_count") == 1
    assert registry.get_sample_value("aggregator_overhead_seconds_sum") < 0.05


async def test_a_target_cancelled_by_a_required_failure_ran_until_the_cancel(start_server):
    _, stub = await start_server()
    timeout = duration_pb2.Duration(nanos=200 * MS)
    request = pb.AggregateRequest(
        targets=[
            http("stuck", "/hang"),
            http("needed", "/hang", required=True, timeout=timeout),
        ]
    )
    results, code, _, trailers = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    stuck = {result.id: result for result in results}["stuck"]
    assert stuck.outcome == pb.OUTCOME_CANCELLED
    assert stuck.start_offset.ToNanoseconds() < 50 * MS
    assert 200 * MS <= stuck.latency.ToNanoseconds() < 1000 * MS
    assert all(_fits(result, trailers) for result in results)


async def test_the_log_counts_requested_targets_and_results_apart(stub, log_lines):
    request = pb.AggregateRequest(
        targets=[http(f"t{i}", "/delay/1", upstream="nowhere") for i in range(3)]
    )
    metadata = (("x-request-id", "invalid-3"),)
    _, code, _, _ = await collect(stub.Aggregate(request, timeout=5, metadata=metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    line = _logged(log_lines, "invalid-3")
    assert (line["targets"], line["results"]) == (3, 0)
    assert "3 targets, 0 results" in line["msg"]
