"""Small upstreams for the examples: REST (catalog, users, orders) and gRPC (the health service,
with server reflection on, so the aggregator can call it in JSON).

    .venv/bin/python examples/upstreams.py examples/config.yaml &

They listen where the config's upstreams point: the port of ``upstreams.catalog.url`` (REST)
and ``upstreams.health.address`` (gRPC). Stop them with ``kill %1`` (or Ctrl-C in the foreground).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import yaml
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

PRODUCTS = {
    "A-1042": {"sku": "A-1042", "name": "Trail running shoe", "price": "129.00"},
    "A-2001": {"sku": "A-2001", "name": "Running sock", "price": "12.00"},
    "B-0310": {"sku": "B-0310", "name": "Water bottle", "price": "18.50"},
}
USERS = {"42": {"id": 42, "name": "Ada"}}
ORDERS = {"42": {"user": 42, "items": [{"sku": "A-1042", "qty": 1}, {"sku": "B-0310", "qty": 2}]}}


def rest_app() -> web.Application:
    def serve(table: dict[str, dict[str, Any]], key: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            found = table.get(request.match_info[key])
            if found is None:
                return web.json_response({"error": "not found"}, status=404)
            return web.json_response(found)

        return handle

    app = web.Application()
    app.router.add_get("/products/{sku}", serve(PRODUCTS, "sku"))
    app.router.add_get("/users/{id}", serve(USERS, "id"))
    app.router.add_get("/orders/{user}", serve(ORDERS, "user"))
    return app


def addresses(config_path: str) -> tuple[str, int, str]:
    """(REST host, REST port, gRPC address) named by the config's catalog and health upstreams."""
    upstreams = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))["upstreams"]
    url = urlsplit(upstreams["catalog"]["url"])
    return url.hostname or "127.0.0.1", url.port or 80, upstreams["health"]["address"]


async def serve(config_path: str) -> None:
    host, port, grpc_address = addresses(config_path)
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):  # kill %1, Ctrl-C: stop cleanly
        asyncio.get_running_loop().add_signal_handler(signal_number, stop.set)
    runner = web.AppRunner(rest_app(), access_log=None)
    await runner.setup()
    server = grpc.aio.server()
    try:
        await web.TCPSite(runner, host, port).start()
        servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        services = (
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(services, server)
        server.add_insecure_port(grpc_address)
        await server.start()
        print(f"example upstreams: REST on {host}:{port}, gRPC on {grpc_address}", flush=True)
        await stop.wait()
    finally:
        await server.stop(None)
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(
        serve(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent / "config.yaml"))
    )
