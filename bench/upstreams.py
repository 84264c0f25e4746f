"""The upstreams every side calls, in a process of their own.

REST: an aiohttp app, ``GET /delay/{ms}``, listening on one port per REST upstream name (as
distinct services would: pools are per host and port); with ``?slow_pct=P&slow_ms=S`` the
request takes S ms instead, P percent of the time (a seeded RNG, so runs are repeatable in
distribution). gRPC: a grpc.aio generic server, ``/bench.v1.Upstream/Delay`` whose request is
the milliseconds as ASCII. Both answer the same small JSON body.

Run as ``python -m bench.upstreams --seed N``: prints ``{"http_ports": {name: port, ...},
"grpc_port": ...}`` on one line, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal

import grpc
from aiohttp import web

from bench.scenarios import DELAY_METHOD, HTTP_UPSTREAMS

# A product-sized answer, so bodies are copied as they would be.
BODY = json.dumps(
    {"sku": "A-1042", "name": "Trail running shoe", "price": "129.00", "tags": ["x"] * 40}
).encode()


def rest_app(rng: random.Random) -> web.Application:
    async def delay(request: web.Request) -> web.Response:
        seconds = float(request.match_info["ms"]) / 1000
        slow_pct = request.query.get("slow_pct")
        if slow_pct is not None and rng.random() * 100 < float(slow_pct):
            seconds = float(request.query.get("slow_ms", "0")) / 1000
        await asyncio.sleep(seconds)
        return web.Response(body=BODY, content_type="application/json")

    app = web.Application()
    app.router.add_get("/delay/{ms}", delay)
    return app


async def _grpc_delay(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await asyncio.sleep(float(request.decode("ascii")) / 1000)
    return BODY


def grpc_server() -> grpc.aio.Server:
    server = grpc.aio.server()
    service, method = DELAY_METHOD.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(_grpc_delay)}
    )
    server.add_generic_rpc_handlers((handler,))
    return server


async def serve(seed: int) -> None:
    runner = web.AppRunner(rest_app(random.Random(seed)), access_log=None)
    await runner.setup()
    http_ports = {}
    for name in HTTP_UPSTREAMS:
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        http_ports[name] = runner.addresses[-1][1]
    server = grpc_server()
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"http_ports": http_ports, "grpc_port": grpc_port}), flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(None)
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstreams")
    parser.add_argument("--seed", type=int, default=7)
    asyncio.run(serve(parser.parse_args().seed))


if __name__ == "__main__":
    main()
