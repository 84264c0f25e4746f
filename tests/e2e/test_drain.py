"""Draining for shutdown (docs/operations.md): every call that reached the process before or
during the drain gets OK or UNAVAILABLE, never CANCELLED (issue 25 #2)."""

from __future__ import annotations

import asyncio
import collections
import signal

import grpc

from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import collect, http, wait_for
from tests.e2e.test_server import serve_process

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
