"""Draining for shutdown (docs/operations.md): every call that reached the process before or
during the drain gets OK or UNAVAILABLE, never CANCELLED (issue 25 #2)."""

from __future__ import annotations

import asyncio
import collections
import signal
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import aggregator_process, collect, http, wait_for
from tests.e2e.test_server import _write_config, serve_process
from tests.upstreams import free_port

__all__ = ["serve_process"]  # the fixture: a child `aggregator serve`, shutdown_grace 2s


async def test_calls_sent_just_before_sigterm_get_ok_or_unavailable(serve_process, rest):
    """grpc's stop cancelled the calls it had received but not yet handed to a handler: most
    of a burst sent just before SIGTERM got CANCELLED (155 of 200), which a client does not
    retry elsewhere. They are refused with UNAVAILABLE while the in-flight call finishes."""
    process, port = serve_process
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AggregatorStub(channel)
        in_flight = stub.Aggregate(pb.AggregateRequest(targets=[http("slow", "/delay/1500")]))
        await wait_for(rest.recorder.arrived)
        burst = [
            stub.Aggregate(pb.AggregateRequest(targets=[http(f"t{n}", "/delay/1")]), timeout=10)
            for n in range(200)
        ]
        await asyncio.sleep(0)  # the burst on its way, then the signal
        process.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*map(collect, burst))
        _, in_flight_code, _, _ = await collect(in_flight)
    codes = collections.Counter(code for _, code, _, _ in answers)
    assert in_flight_code == grpc.StatusCode.OK
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert codes[grpc.StatusCode.UNAVAILABLE] > 0  # the drain did refuse some
    async with asyncio.timeout(10):
        assert await process.wait() == 0


@pytest.fixture
async def long_grace_process(
    tmp_path, rest
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """`aggregator serve` with shutdown_grace 10s: what waits for the grace shows."""
    port = free_port()
    config = tmp_path / "config.yaml"
    _write_config(config, port, rest, grace="10s")
    async with aggregator_process(config, port) as process:
        yield process, port


async def test_the_drain_ends_open_watch_streams_once_the_calls_are_done(long_grace_process, rest):
    """An open health Watch held grpc's stop for the whole shutdown_grace (20.3 s measured with
    20 s) after the last call had ended. It gets NOT_SERVING, then its end, and the process
    exits as soon as the real calls are done."""
    process, port = long_grace_process
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.AggregatorStub(channel)
        in_flight = stub.Aggregate(pb.AggregateRequest(targets=[http("slow", "/delay/300")]))
        await wait_for(rest.recorder.arrived)
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        process.send_signal(signal.SIGTERM)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await watch.read() == grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
        _, code, _, _ = await collect(in_flight)
        assert code == grpc.StatusCode.OK
    async with asyncio.timeout(10):
        assert await process.wait() == 0
    assert loop.time() - signalled < 5  # the grace is 10 s: nothing waited for it
