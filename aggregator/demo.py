"""`aggregator demo`: a product page of six calls, served by built-in upstreams, streamed live.

Catalogue, pricing, inventory, recommendations and reviews are REST endpoints of one aiohttp
app; shipping is a gRPC service. Everything listens on 127.0.0.1 on free ports. The page is a
named aggregate (``aggregates.product_page``, docs/named-aggregates.md): the demo calls it
by name with its one parameter, ``sku``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format, struct_pb2

from aggregator.client import aggregate, ending_lines
from aggregator.config import Config, config_from_mapping
from aggregator.lifecycle import AggregatorServer
from aggregator.timeline import Style, Timeline, TimelineView, body_lines, is_terminal
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc

SHIPPING_METHOD = "/demo.v1.Shipping/Quote"
PAGE_NAME = "product_page"
SKU = "A-1042"


@dataclass(frozen=True, slots=True)
class DemoCall:
    id: str
    delay: float
    body: dict[str, Any]
    status: int = 200


PAGE = (
    DemoCall("catalog", 0.120, {"sku": "A-1042", "name": "Trail running shoe"}),
    DemoCall("pricing", 0.095, {"sku": "A-1042", "price": "129.00", "currency": "EUR"}),
    DemoCall("inventory", 0.110, {"sku": "A-1042", "in_stock": 17}),
    DemoCall("recommendations", 0.140, {"skus": ["A-2001", "B-0310", "C-7781"]}),
    # Overloaded: the request carries a fallback, so the page still renders.
    DemoCall("reviews", 0.045, {"error": "overloaded"}, status=503),
)
REVIEWS_FALLBACK = {"reviews": [], "note": "reviews are unavailable right now"}
CACHED = "catalog"  # cached for a minute: the warm-up call fills it, the shown call hits it
SHIPPING = DemoCall("shipping", 0.065, {"carrier": "DHL", "days": 2})


def _rest_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        call = next(c for c in PAGE if c.id == request.match_info["name"])
        await asyncio.sleep(call.delay)
        return web.json_response(call.body, status=call.status)

    app = web.Application()
    app.router.add_get(f"/{{name}}/{SKU}", handle)
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
    upstreams: dict[str, dict[str, Any]] = {
        call.id: {"kind": "http", "url": f"http://127.0.0.1:{rest_port}", "timeout": "1s"}
        for call in PAGE
    }
    upstreams[CACHED]["cache"] = {"ttl": "60s"}
    upstreams["shipping"] = {"kind": "grpc", "address": f"127.0.0.1:{grpc_port}"}
    page = {
        "description": "Everything a product page shows",
        "params": {"sku": {"required": True}},
        # The targets in their proto3 JSON mapping, as a config file holds them.
        "targets": [
            json_format.MessageToDict(target, preserving_proto_field_name=True)
            for target in page_targets("{{params.sku}}")
        ],
    }
    return config_from_mapping(
        {
            "server": {"address": "127.0.0.1:0", "metrics_address": "", "admin_address": ""},
            "upstreams": upstreams,
            "aggregates": {PAGE_NAME: page},
        }
    )


def demo_request() -> pb.AggregateRequest:
    """The product page, called by name."""
    request = pb.AggregateRequest(aggregate=PAGE_NAME)
    request.params.update({"sku": SKU})
    return request


def page_targets(sku: str) -> list[pb.Target]:
    targets = [
        pb.Target(
            id=call.id,
            http=pb.HttpCall(upstream=call.id, path=f"/{call.id}/{sku}"),
            decode_json=True,
            required=call.id == "catalog",
        )
        for call in PAGE
    ]
    reviews = next(target for target in targets if target.id == "reviews")
    reviews.fallback.struct_value.update(REVIEWS_FALLBACK)
    targets.append(
        pb.Target(id="shipping", grpc=pb.GrpcCall(upstream="shipping", method=SHIPPING_METHOD))
    )
    return targets


async def run_demo() -> None:
    # The server's log lines would interleave with the timeline: only warnings during the demo.
    server_log = logging.getLogger("aggregator")
    level = server_log.level
    server_log.setLevel(logging.WARNING)
    try:
        async with demo_upstreams() as (rest_port, grpc_port):
            server = AggregatorServer(demo_config(rest_port, grpc_port))
            port = await server.start()
            try:
                await _show(port)
            finally:
                await server.drain()
    finally:
        server_log.setLevel(level)


async def _show(port: int) -> None:
    calls = (*PAGE, SHIPPING)
    one_after_another = sum(call.delay for call in calls)
    print(
        f"aggregator on 127.0.0.1:{port}: a product page of {len(calls)} calls, "
        f'called by name: {{"aggregate": "{PAGE_NAME}", "params": {{"sku": "{SKU}"}}}}'
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AggregatorStub(channel)  # type: ignore[no-untyped-call]
        async for _ in stub.Aggregate(demo_request(), timeout=2):  # warm the connections
            pass
        style = Style.for_stream(sys.stdout)
        view = TimelineView(sys.stdout, Timeline(page_targets(SKU), style), is_terminal(sys.stdout))
        try:
            ending = await aggregate(channel, demo_request(), view, timeout=2)
        finally:
            view.finish()
    elapsed = view.elapsed()
    lines = body_lines(view.timeline.rows, style, limit=style.width - 20)
    print("\n".join([*lines, *ending_lines(ending, view.timeline, elapsed)]))
    print(
        f"total {elapsed * 1000:.0f} ms for calls that take {one_after_another * 1000:.0f} ms "
        f"one after another (slowest alone: {max(c.delay for c in calls) * 1000:.0f} ms)"
    )
