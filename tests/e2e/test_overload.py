"""Overload ends in RESOURCE_EXHAUSTED with a sentence, never CANCELLED (issue 25 #3;
docs/operations.md, "Overload")."""

from __future__ import annotations

import asyncio
import collections

import grpc

from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import StartServer, collect, http

BURST = 1_500  # calls sent at once over one channel, well over max_concurrent_calls


async def test_a_burst_over_the_limit_is_refused_never_cancelled(start_server: StartServer):
    """grpc holds the calls it received and the loop has not taken yet, and past its default
    limits (a random share from 1,000 waiting, all from 3,000) it ended them CANCELLED without
    a handler ever seeing them: 357 of 3,000 here, which a caller cannot tell from its own
    cancellation. Every call now reaches the handler, which refuses what is over
    server.max_concurrent_calls."""
    _, stub = await start_server(server={"max_concurrent_calls": 50, "log_level": "error"})
    request = pb.AggregateRequest(targets=[http("slow", "/delay/300")])
    answers = await asyncio.gather(
        *(collect(stub.Aggregate(request, timeout=30)) for _ in range(BURST))
    )
    codes = collections.Counter(code for _, code, _, _ in answers)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    refusals = {details for _, code, details, _ in answers if code != grpc.StatusCode.OK}
    assert refusals == {"more than server.max_concurrent_calls (50) calls in flight"}
