"""OpenTelemetry: a span per aggregate continuing the caller's trace, one per attempt, and the
attempt's traceparent reaching REST and gRPC upstreams."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from aggregator import tracing
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import collect, http, rpc_target
from tests.upstreams import free_port

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.disable()
        provider.shutdown()


def traceparent_parts(value: str) -> tuple[str, str]:
    _, trace_id, span_id, _ = value.split("-")
    return trace_id, span_id


async def test_spans_continue_the_callers_trace_and_reach_upstreams(stub, rest, rpc, spans):
    caller = (("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"),)
    request = pb.AggregateRequest(targets=[http("a", "/delay/1"), rpc_target("b", "Echo", b"x")])
    await collect(stub.Aggregate(request, timeout=5, metadata=caller))

    finished = spans.get_finished_spans()
    (server,) = [s for s in finished if s.kind == SpanKind.SERVER]
    attempts = [s for s in finished if s.kind == SpanKind.CLIENT]
    assert server.name == "aggregator.v1.Aggregator/Aggregate"
    assert f"{server.context.trace_id:032x}" == CALLER_TRACE
    assert f"{server.parent.span_id:016x}" == CALLER_SPAN
    assert server.attributes["aggregator.targets"] == 2
    assert server.attributes["aggregator.aggregate"] == "ad_hoc"
    assert sorted(s.name for s in attempts) == ["rest attempt", "rpc attempt"]
    assert all(s.parent.span_id == server.context.span_id for s in attempts)

    by_name = {s.name: s for s in attempts}
    rest_trace, rest_span = traceparent_parts(rest.recorder.requests[0]["headers"]["traceparent"])
    assert rest_trace == CALLER_TRACE
    assert rest_span == f"{by_name['rest attempt'].context.span_id:016x}"
    assert by_name["rest attempt"].attributes["http.response.status_code"] == 200
    rpc_trace, rpc_span = traceparent_parts(rpc.recorder.requests[0]["metadata"]["traceparent"])
    assert (rpc_trace, rpc_span) == (CALLER_TRACE, f"{by_name['rpc attempt'].context.span_id:016x}")


async def test_a_call_without_traceparent_starts_a_new_trace(stub, rest, spans):
    await collect(stub.Aggregate(pb.AggregateRequest(targets=[http("a", "/delay/1")]), timeout=5))
    (server,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server.parent is None


async def test_tracing_off_sends_no_traceparent(stub, rest):
    await collect(stub.Aggregate(pb.AggregateRequest(targets=[http("a", "/delay/1")]), timeout=5))
    assert "traceparent" not in rest.recorder.requests[0]["headers"]


async def test_tracing_section_turns_tracing_on_in_serve(tmp_path, rest):
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
server: {{address: "127.0.0.1:{port}", metrics_address: "", admin_address: "", shutdown_grace: 1s}}
upstreams: {{rest: {{kind: http, url: "{rest.url}"}}}}
tracing: {{exporter: console, service_name: traced-aggregator}}
"""
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aggregator", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        # Quick reconnects: the server takes a moment to import OpenTelemetry and bind.
        options = (
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 200),
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = pb_grpc.AggregatorStub(channel)
            request = pb.AggregateRequest(targets=[http("a", "/delay/1")])
            results, _, _, _ = await collect(
                stub.Aggregate(request, timeout=20, wait_for_ready=True)
            )
            assert [r.outcome for r in results] == [pb.OUTCOME_OK]
        traceparent = rest.recorder.requests[0]["headers"]["traceparent"]
        assert traceparent.startswith("00-")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await process.communicate()
    assert process.returncode == 0
    text = output.decode()
    assert '"name": "aggregator.v1.Aggregator/Aggregate"' in text
    assert '"service.name": "traced-aggregator"' in text
