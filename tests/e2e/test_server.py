"""The server as Kubernetes and grpcurl see it: health, reflection, SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import aggregator_process, collect, http, wait_for
from tests.upstreams import RestUpstream, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def channel(start_server) -> AsyncIterator[grpc.aio.Channel]:
    server, _ = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.mark.parametrize("service", ["", "aggregator.v1.Aggregator"])
async def test_health_reports_serving(channel, service):
    health = health_pb2_grpc.HealthStub(channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert response.status == SERVING


async def test_health_unknown_service_is_not_found(channel):
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_list_answers_every_service(channel):
    """grpc.health.v1 List (advertised by reflection) answered UNKNOWN "Unexpected <class
    'NotImplementedError'>" with grpcio's own async servicer."""
    health = health_pb2_grpc.HealthStub(channel)
    listed = await health.List(health_pb2.HealthListRequest(), timeout=5)
    assert {name: status.status for name, status in listed.statuses.items()} == {
        "": SERVING,
        "aggregator.v1.Aggregator": SERVING,
    }


async def test_reflection_lists_aggregator_health_and_reflection(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for response in stub.ServerReflectionInfo(iter([request]), timeout=5):
        names = {s.name for s in response.list_services_response.service}
        break
    assert names == {
        "aggregator.v1.Aggregator",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_reflection_v1_answers_like_v1alpha(channel):
    # grpcurl and buf curl ask v1 first. Same messages, other package: v1alpha's classes parse it.
    info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="aggregator.v1.Target")
    call = info(iter([request.SerializeToString()]), timeout=5)
    response = reflection_pb2.ServerReflectionResponse.FromString(await call.read())
    protos = response.file_descriptor_response.file_descriptor_proto
    assert any(b"aggregator/v1/aggregator.proto" in proto for proto in protos)
    assert response.original_request.file_containing_symbol == "aggregator.v1.Target"


async def test_reflection_serves_the_aggregator_file(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="aggregator.v1.Target")
    async for response in stub.ServerReflectionInfo(iter([request]), timeout=5):
        protos = response.file_descriptor_response.file_descriptor_proto
        break
    assert protos
    assert any(b"aggregator/v1/aggregator.proto" in proto for proto in protos)


def _write_config(path: Path, port: int, rest: RestUpstream, grace: str) -> None:
    path.write_text(
        f"""
server:
  address: "127.0.0.1:{port}"
  metrics_address: ""
  admin_address: ""
  shutdown_grace: {grace}
upstreams:
  rest: {{kind: http, url: "{rest.url}", timeout: 20s}}
"""
    )


@pytest.fixture
async def serve_process(tmp_path, rest) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """`aggregator serve` in a child process, ready when its health says SERVING."""
    port = free_port()
    config = tmp_path / "config.yaml"
    _write_config(config, port, rest, grace="2s")
    async with aggregator_process(config, port) as process:
        yield process, port


async def test_sigterm_drains_in_flight_calls_and_exits_zero(serve_process, rest):
    process, port = serve_process
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="aggregator.v1.Aggregator"), timeout=10
        )
        assert (await watch.read()).status == SERVING
        stub = pb_grpc.AggregatorStub(channel)
        in_flight = stub.Aggregate(pb.AggregateRequest(targets=[http("slow", "/delay/700")]))
        await wait_for(rest.recorder.arrived)

        process.send_signal(signal.SIGTERM)

        assert (await watch.read()).status == NOT_SERVING
        late = stub.Aggregate(pb.AggregateRequest(targets=[http("late", "/delay/1")]), timeout=5)
        _, late_code, _, _ = await collect(late)
        assert late_code == grpc.StatusCode.UNAVAILABLE
        results, code, _, trailers = await collect(in_flight)
        assert code == grpc.StatusCode.OK
        assert [(r.id, r.outcome) for r in results] == [("slow", pb.OUTCOME_OK)]
        assert trailers["x-aggregate-completed"] == "true"
    async with asyncio.timeout(10):
        assert await process.wait() == 0
    assert len(rest.recorder.requests) == 1


async def test_sigterm_cancels_calls_that_outlive_the_grace(serve_process, rest):
    process, port = serve_process
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AggregatorStub(channel)
        stuck = stub.Aggregate(pb.AggregateRequest(targets=[http("stuck", "/hang")]), timeout=30)
        await wait_for(rest.recorder.hanging)
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        process.send_signal(signal.SIGTERM)
        _, code, _, _ = await collect(stuck)
        assert code != grpc.StatusCode.OK
        await wait_for(rest.recorder.cancelled)
    async with asyncio.timeout(10):
        assert await process.wait() == 0
    # Grace is 2 s: the process gives up on the call then, not at the call's 30 s deadline.
    assert loop.time() - signalled < 8


def test_event_loop_choice() -> None:
    import uvloop

    from aggregator.lifecycle import event_loop_factory

    assert event_loop_factory("asyncio") is None
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("auto") is uvloop.new_event_loop  # uvloop is a dependency here


async def test_a_call_cut_by_the_grace_is_logged_as_cut_by_shutdown(serve_process, rest):
    process, port = serve_process
    request = pb.AggregateRequest(targets=[http("quick", "/delay/1"), http("stuck", "/hang")])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stuck = pb_grpc.AggregatorStub(channel).Aggregate(
            request, timeout=30, metadata=(("x-request-id", "cut-by-grace"),)
        )
        assert (await stuck.read()).id == "quick"
        await wait_for(rest.recorder.hanging)
        process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await stuck.read()
    code, details = cut.value.code(), cut.value.details()
    assert process.stdout is not None
    async with asyncio.timeout(10):
        log = (await process.stdout.read()).decode()
        assert await process.wait() == 0
    assert code == grpc.StatusCode.UNAVAILABLE, details
    [line] = [line for line in log.splitlines() if "request_id=cut-by-grace" in line]
    assert "aggregate cut-by-grace: UNAVAILABLE, 2 targets, 1 results, 1 failed" in line
    assert 'error="cut by shutdown: server.shutdown_grace (2s) ran out"' in line
    assert " targets=2 results=1 failed=stuck " in line
    # The target cut by the grace was the slowest: the 2 s it ran are not overhead.
    assert " slowest=stuck " in line
    fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
    assert float(fields["elapsed_ms"]) >= 2000
    assert float(fields["overhead_ms"]) < 500
