"""The peers the aggregator is measured against: what a user could write in an afternoon.

A grpc.aio server implementing the same ``aggregator.v1.Aggregator/Aggregate``: every target is
called over ONE shared aiohttp ClientSession (or a grpc.aio channel per gRPC upstream) and the
results are streamed as they complete (``asyncio.as_completed``), with no validation, no
policies, no deadline handling and two trailers. ``--sequential`` awaits the same calls one after
another: the "before" picture. ``--floor`` calls nothing at all: it waits as long as the slowest
target would take and streams ready-made results, so its overhead is grpc.aio's own. Run as
``python -m bench.naive --upstreams JSON [--sequential | --floor]``: prints ``{"port": ...}`` on
one line, serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import grpc
from google.protobuf import json_format

from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from bench import quote
from bench.procs import run_loop
from bench.scenarios import CONNECTIONS_PER_UPSTREAM
from bench.upstreams import BODY


class NaiveAggregator(pb_grpc.AggregatorServicer):
    def __init__(self, upstreams: Mapping[str, Mapping[str, str]], sequential: bool) -> None:
        self._sequential = sequential
        self._urls = {name: u["url"] for name, u in upstreams.items() if u["kind"] == "http"}
        self._channels = {
            name: grpc.aio.insecure_channel(u["address"])
            for name, u in upstreams.items()
            if u["kind"] == "grpc"
        }
        self._methods: dict[tuple[str, str], Any] = {}
        # The textbook session, except that its pool is sized like the aggregator's (per upstream
        # rather than 100 in all), so that pool size is not what the benchmark compares.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=CONNECTIONS_PER_UPSTREAM)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        )

    async def Aggregate(
        self, request: pb.AggregateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.TargetResult]:
        succeeded = 0
        async for result in self._results(request.targets):
            succeeded += result.outcome == pb.OUTCOME_OK
            yield result
        completed = "true" if succeeded == len(request.targets) else "false"
        context.set_trailing_metadata(
            (("x-aggregate-completed", completed), ("x-aggregate-succeeded", str(succeeded)))
        )

    async def _results(self, targets: Any) -> AsyncIterator[pb.TargetResult]:
        started = time.perf_counter_ns()
        if self._sequential:
            for target in targets:
                yield await self._call(target, started)
        else:
            for next_done in asyncio.as_completed([self._call(t, started) for t in targets]):
                yield await next_done

    async def _call(self, target: pb.Target, started: int) -> pb.TargetResult:
        result = pb.TargetResult(id=target.id, attempts=1)
        begun = time.perf_counter_ns()
        try:
            if target.HasField("grpc"):
                await self._grpc(target, result)
            else:
                await self._http(target.http, result)
        except Exception as exc:  # the textbook catch-all
            result.outcome = pb.OUTCOME_UNAVAILABLE
            result.error = str(exc)
        ended = time.perf_counter_ns()
        result.start_offset.FromNanoseconds(begun - started)
        result.latency.FromNanoseconds(ended - begun)
        return result

    async def _http(self, call: pb.HttpCall, result: pb.TargetResult) -> None:
        url = self._urls[call.upstream] + call.path
        async with self._session.request(
            call.method or "GET", url, params=dict(call.query), headers=dict(call.headers)
        ) as response:
            result.body = await response.read()
        result.http_status = response.status
        result.content_type = response.headers.get("Content-Type", "")
        result.outcome = pb.OUTCOME_OK if response.status < 300 else pb.OUTCOME_ERROR

    async def _grpc(self, target: pb.Target, result: pb.TargetResult) -> None:
        call = target.grpc
        key = (call.upstream, call.method)
        method = self._methods.get(key)
        if method is None:
            channel = self._channels[call.upstream]
            method = self._methods[key] = channel.unary_unary(call.method, None, None)
        request = _from_json(call) if call.HasField("json") else call.request
        try:
            result.body = await method(request, metadata=tuple(call.metadata.items()))
            result.outcome = pb.OUTCOME_OK
        except grpc.aio.AioRpcError as exc:
            result.grpc_code = exc.code().value[0]
            result.outcome = pb.OUTCOME_ERROR
            return
        if target.decode_json:
            result.json.struct_value.update(_to_json(call.method, result.body))

    async def aclose(self) -> None:
        await self._session.close()
        for channel in self._channels.values():
            await channel.close(None)


# A naive user has the generated classes of the methods they call (here bench/quote.py's) and
# converts with json_format: the textbook way, for grpc5-json.
_CLASSES = {quote.METHOD: (quote.message_class("QuoteRequest"), quote.message_class("Quote"))}


def _from_json(call: pb.GrpcCall) -> bytes:
    request = json_format.ParseDict(
        json_format.MessageToDict(call.json), _CLASSES[call.method][0]()
    )
    return bytes(request.SerializeToString())


def _to_json(method: str, body: bytes) -> Any:
    return json_format.MessageToDict(_CLASSES[method][1].FromString(body))


class Floor(pb_grpc.AggregatorServicer):
    """The gRPC stack's floor: one wait as long as the slowest target's delay (read from its
    ``/delay/{ms}`` path or gRPC request), then one result per target with the upstreams' body.
    Each result's latency is the wait as measured, so overhead is everything but the wait."""

    async def Aggregate(
        self, request: pb.AggregateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.TargetResult]:
        slowest = max(_delay_ms(target) for target in request.targets)
        begun = time.perf_counter_ns()
        await asyncio.sleep(slowest / 1000)
        waited = time.perf_counter_ns() - begun
        for target in request.targets:
            result = pb.TargetResult(
                id=target.id, outcome=pb.OUTCOME_OK, http_status=200, body=BODY, attempts=1
            )
            result.latency.FromNanoseconds(waited)
            yield result

    async def aclose(self) -> None:
        pass


def _delay_ms(target: pb.Target) -> float:
    if target.HasField("grpc"):
        return float(target.grpc.request.decode("ascii"))
    return float(target.http.path.removeprefix("/delay/"))


async def serve(upstreams: Mapping[str, Mapping[str, str]], mode: str) -> None:
    server = grpc.aio.server()
    servicer: NaiveAggregator | Floor = (
        Floor() if mode == "floor" else NaiveAggregator(upstreams, mode == "sequential")
    )
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"port": port}), flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(1)
        await servicer.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive")
    parser.add_argument("--upstreams", required=True, help="JSON: name -> {kind, url|address}")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--sequential", action="store_true", help="await one call at a time")
    modes.add_argument("--floor", action="store_true", help="call nothing: grpc.aio's floor")
    args = parser.parse_args()
    mode = "sequential" if args.sequential else "floor" if args.floor else "naive"
    # On the aggregator's event loop (uvloop when installed), so the loop is not what is compared.
    run_loop(serve(json.loads(args.upstreams), mode))


if __name__ == "__main__":
    main()
