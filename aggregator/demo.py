"""`aggregator demo`: a product page of five calls, served by built-in upstreams, streamed live.

Catalogue, pricing, inventory and recommendations are REST endpoints of one aiohttp app;
shipping is a gRPC service. Everything listens on 127.0.0.1 on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import struct_pb2

from aggregator.config import Config, config_from_mapping
from aggregator.server import AggregatorServer
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc

SHIPPING_METHOD = "/demo.v1.Shipping/Quote"


@dataclass(frozen=True, slots=True)
class DemoCall:
    id: str
    delay: float
    body: dict[str, Any]


PAGE = (
    DemoCall("catalog", 0.120, {"sku": "A-1042", "name": "Trail running shoe"}),
    DemoCall("pricing", 0.095, {"sku": "A-1042", "price": "129.00", "currency": "EUR"}),
    DemoCall("inventory", 0.110, {"sku": "A-1042", "in_stock": 17}),
    DemoCall("recommendations", 0.140, {"skus": ["A-2001", "B-0310", "C-7781"]}),
)
SHIPPING = DemoCall("shipping", 0.065, {"carrier": "DHL", "days": 2})


def _rest_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        call = next(c for c in PAGE if c.id == request.match_info["name"])
        await asyncio.sleep(call.delay)
        return web.json_response(call.body)

    app = web.Application()
    app.router.add_get("/{name}/A-1042", handle)
    return app


async def _shipping_quote(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await asyncio.sleep(SHIPPING.delay)
    answer = struct_pb2.Struct()
    answer.update(SHIPPING.body)
    return answer.SerializeToString()


@contextlib.asynccontextmanager
async def demo_upstreams() -> AsyncIterator[tuple[int, int]]:
    """Runs the REST and gRPC demo upstreams; yields their ports."""
    runner = web.AppRunner(_rest_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rest_port = runner.addresses[0][1]
    shipping = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "demo.v1.Shipping", {"Quote": grpc.unary_unary_rpc_method_handler(_shipping_quote)}
    )
    shipping.add_generic_rpc_handlers((handler,))
    grpc_port = shipping.add_insecure_port("127.0.0.1:0")
    await shipping.start()
    try:
        yield rest_port, grpc_port
    finally:
        await shipping.stop(None)
        await runner.cleanup()


def demo_config(rest_port: int, grpc_port: int) -> Config:
    upstreams: dict[str, object] = {
        call.id: {"kind": "http", "url": f"http://127.0.0.1:{rest_port}", "timeout": "1s"}
        for call in PAGE
    }
    upstreams["shipping"] = {"kind": "grpc", "address": f"127.0.0.1:{grpc_port}"}
    return config_from_mapping(
        {"server": {"address": "127.0.0.1:0", "metrics_address": ""}, "upstreams": upstreams}
    )


def demo_request() -> pb.AggregateRequest:
    targets = [
        pb.Target(
            id=call.id,
            http=pb.HttpCall(upstream=call.id, path=f"/{call.id}/A-1042"),
            decode_json=True,
            required=call.id == "catalog",
        )
        for call in PAGE
    ]
    targets.append(
        pb.Target(id="shipping", grpc=pb.GrpcCall(upstream="shipping", method=SHIPPING_METHOD))
    )
    return pb.AggregateRequest(targets=targets)


def render_result(result: pb.TargetResult, elapsed: float) -> str:
    """One line per result: when it arrived, what it was, and a bar on a time axis."""
    latency_ms = result.latency.ToNanoseconds() / 1e6
    offset_ms = result.start_offset.ToNanoseconds() / 1e6
    bar = " " * round(offset_ms / 10) + "█" * max(1, round(latency_ms / 10))
    answer = f"HTTP {result.http_status}" if result.http_status else f"gRPC {result.grpc_code}"
    value = (
        json.dumps(json.loads(result.body))
        if result.HasField("json")
        else f"{len(result.body)} bytes"
    )
    outcome = pb.Outcome.Name(result.outcome).removeprefix("OUTCOME_")
    return (
        f"  +{elapsed * 1000:6.1f} ms  {result.id:<16} {outcome:<8} {answer:<9} "
        f"{latency_ms:6.1f} ms  {bar:<16}  {value[:60]}"
    )


async def run_demo() -> None:
    async with demo_upstreams() as (rest_port, grpc_port):
        server = AggregatorServer(demo_config(rest_port, grpc_port))
        port = await server.start()
        try:
            await _show(port)
        finally:
            await server.drain()


async def _show(port: int) -> None:
    total_of_calls = sum(call.delay for call in (*PAGE, SHIPPING)) * 1000
    print(f"aggregator on 127.0.0.1:{port}: a product page of {len(PAGE) + 1} calls")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AggregatorStub(channel)  # type: ignore[no-untyped-call]
        async for _ in stub.Aggregate(demo_request(), timeout=2):  # warm the connections
            pass
        started = time.perf_counter()
        call = stub.Aggregate(demo_request(), timeout=2)
        async for result in call:
            print(render_result(result, time.perf_counter() - started))
        total = (time.perf_counter() - started) * 1000
        print(f"status {(await call.code()).name}; trailers:")
        for key, value in await call.trailing_metadata() or ():
            if not key.endswith("-bin"):
                print(f"    {key}: {value}")
    print(
        f"total {total:.0f} ms for calls that take {total_of_calls:.0f} ms one after another "
        f"(slowest alone: {max(c.delay for c in (*PAGE, SHIPPING)) * 1000:.0f} ms)"
    )
