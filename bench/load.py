"""The load generator, in a process of its own: grpc.aio clients, N concurrent workers.

Driven over stdin/stdout, one JSON object a line each way, so the orchestrator can read the
servers' CPU counters right around each slice of load:

    {"op": "ready", "target": "127.0.0.1:PORT", "timeout": 20}
    {"op": "run", "target": ..., "scenario": "page5", "side": "naive", "concurrency": 64,
     "max_calls": 1000, "seconds": 2.0, "warmup": false, "channels": 1}

``channels`` above 1 spreads the workers over that many channels, each its own connection, as
SO_REUSEPORT spreads connections (not calls) over a server's ``server.workers`` processes.

A slice stops starting calls at ``max_calls`` or after ``seconds``, whichever comes first, and
waits for the calls in flight. It answers with one record per completed call (milliseconds):
total latency, time to the first result, and the slowest ``TargetResult.latency`` of the call.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from typing import Any

import grpc

from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from bench.procs import run_loop
from bench.scenarios import SCENARIOS


class Load:
    def __init__(self) -> None:
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}

    def _stubs(self, target: str, count: int = 1) -> list[pb_grpc.AggregatorStub]:
        return [
            pb_grpc.AggregatorStub(self._channel(target, index))  # type: ignore[no-untyped-call]
            for index in range(count)
        ]

    def _channel(self, target: str, index: int) -> grpc.aio.Channel:
        channel = self._channels.get((target, index))
        if channel is None:
            # Channels to one target share a connection unless each has its own subchannels.
            options = (("grpc.use_local_subchannel_pool", 1),) if index else ()
            channel = grpc.aio.insecure_channel(target, options=options)
            self._channels[(target, index)] = channel
        return channel

    async def ready(self, target: str, timeout: float) -> dict[str, Any]:
        try:
            await asyncio.wait_for(self._channel(target, 0).channel_ready(), timeout)
        except TimeoutError:
            return {"ready": False}
        return {"ready": True}

    async def run(self, command: dict[str, Any]) -> dict[str, Any]:
        scenario = SCENARIOS[command["scenario"]]
        request = scenario.request_for(command["side"], warmup=command["warmup"])
        # A named aggregate's request holds no targets: count the ones the others are sent.
        targets = len(scenario.request_for("naive", warmup=command["warmup"]).targets)
        stubs = self._stubs(command["target"], command.get("channels", 1))
        slice_ = _Slice(stubs, request, scenario.timeout, targets)
        return await slice_.run(command["concurrency"], command["max_calls"], command["seconds"])

    async def aclose(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)


class _Slice:
    """One slice of load against one side."""

    def __init__(
        self,
        stubs: list[pb_grpc.AggregatorStub],
        request: pb.AggregateRequest,
        timeout: float,
        targets: int,
    ) -> None:
        self._stubs = stubs
        self._request = request
        self._timeout = timeout
        self._targets = targets
        self._issued = 0
        self.latency: list[float] = []
        self.first: list[float] = []
        self.slowest: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.not_ok: collections.Counter[str] = collections.Counter()  # outcome -> results
        self.not_ok_sample = ""  # one error sentence, to tell what went wrong
        self.incomplete = 0

    async def run(self, concurrency: int, max_calls: int, seconds: float) -> dict[str, Any]:
        started = time.perf_counter()
        stop_at = started + seconds
        stubs = [self._stubs[i % len(self._stubs)] for i in range(concurrency)]
        await asyncio.gather(*(self._worker(stub, max_calls, stop_at) for stub in stubs))
        return {
            "wall_s": time.perf_counter() - started,
            "latency_ms": self.latency,
            "first_ms": self.first,
            "slowest_upstream_ms": self.slowest,
            "errors": dict(self.errors),
            "not_ok": dict(self.not_ok),
            "not_ok_sample": self.not_ok_sample,
            "incomplete": self.incomplete,
        }

    async def _worker(self, stub: pb_grpc.AggregatorStub, max_calls: int, stop_at: float) -> None:
        while self._issued < max_calls and time.perf_counter() < stop_at:
            self._issued += 1
            await self._one(stub)

    async def _one(self, stub: pb_grpc.AggregatorStub) -> None:
        started = time.perf_counter()
        first = 0.0
        slowest = 0.0
        count = 0
        try:
            async for result in stub.Aggregate(self._request, timeout=self._timeout):
                if not count:
                    first = time.perf_counter()
                count += 1
                latency = result.latency.seconds + result.latency.nanos / 1e9
                slowest = max(slowest, latency)
                if result.outcome != pb.OUTCOME_OK:
                    self._not_ok(result)
        except grpc.aio.AioRpcError as exc:
            self.errors[exc.code().name] += 1
            self.not_ok_sample = self.not_ok_sample or f"{exc.code().name}: {exc.details()}"
            return
        ended = time.perf_counter()
        self.incomplete += count != self._targets
        self.latency.append(round((ended - started) * 1000, 4))
        self.first.append(round((first - started) * 1000, 4))
        self.slowest.append(round(slowest * 1000, 4))

    def _not_ok(self, result: pb.TargetResult) -> None:
        self.not_ok[pb.Outcome.Name(result.outcome)] += 1
        self.not_ok_sample = self.not_ok_sample or f"{result.id}: {result.error}"


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    load = Load()
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command["op"] == "ready":
                answer = await load.ready(command["target"], command["timeout"])
            else:
                answer = await load.run(command)
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        await load.aclose()


if __name__ == "__main__":
    run_loop(main())
