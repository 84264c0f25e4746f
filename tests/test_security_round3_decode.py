"""Security review round 3 (issue 23), the decode side: one parse and one memo per body
(finding 4), descriptor refreshes that keep an identical schema (5), reflection that redefines
``google.protobuf`` (10), and gRPC JSON errors that never quote a value (7, in part). Real
servers and sockets on 127.0.0.1 throughout; the loop's lag is measured by a ticking task."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import collect, http
from tests.test_security_decode import big_channel, big_json_upstream, big_upstream


class LoopLag:
    """A task that wakes every ``tick`` seconds and keeps the worst delay past its wake-up: how
    long the event loop (shared by the server and the test) was held by something else."""

    def __init__(self, tick: float = 0.005) -> None:
        self.tick = tick
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.tick)  # measuring the loop, not waiting for an event
            self.worst = max(self.worst, time.perf_counter() - started - self.tick)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[LoopLag]:
        self._task = asyncio.create_task(self._run(), name="loop lag")
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# Finding 4. Before the fix each dependent parsed the 1 MB body again, on the loop: 99 parses
# held the loop for seconds (3.8 s in the review).
NOT_QUITE_JSON = b"[" + b"0," * 250_000 + b"x"  # 500 KB


@pytest.mark.parametrize("decode_json", [True, False], ids=["decode_json", "read_only"])
async def test_a_body_that_is_not_json_is_parsed_once_for_all_its_dependents(
    start_server, decode_json
):
    async with big_json_upstream(NOT_QUITE_JSON) as url:
        aggregator, _ = await start_server(big=big_upstream(url))
        source = http("source", "/source", upstream="big", decode_json=decode_json)
        readers = [http(f"r{i}", "/echo/{{source.a}}", depends_on=["source"]) for i in range(99)]
        async with big_channel(aggregator.port) as channel, LoopLag().watching() as lag:
            call = pb_grpc.AggregatorStub(channel).Aggregate(
                pb.AggregateRequest(targets=[source, *readers]), timeout=60
            )
            results, code, details, _ = await collect(call)
    assert code == grpc.StatusCode.OK, details
    by_id = {result.id: result for result in results}
    assert by_id["source"].outcome == pb.OUTCOME_OK
    assert not by_id["source"].HasField("json")
    for reader in readers:
        assert by_id[reader.id].outcome == pb.OUTCOME_ERROR
        assert by_id[reader.id].error == "dependency 'source' did not answer with JSON"
    print(f"worst loop lag: {lag.worst * 1000:.0f} ms")
    assert lag.worst < 0.15
