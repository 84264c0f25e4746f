"""The upstreams every side calls, in a process of their own.

REST: a minimal HTTP/1.1 server (DelayProtocol), ``GET /delay/{ms}``, listening on one port
per REST upstream name (as distinct services would: pools are per host and port); with
``?slow_pct=P&slow_ms=S`` the request takes S ms instead, P percent of the time (a seeded RNG,
so runs are repeatable in distribution). gRPC: a grpc.aio generic server,
``/bench.v1.Upstream/Delay`` whose request is
the milliseconds as ASCII. Both answer the same small JSON body. The gRPC server also serves a
typed method, ``/bench.v1.Quotes/Get`` (bench/quote.py), with its reflection.

Run as ``python -m bench.upstreams --seed N``: prints ``{"http_ports": {name: port, ...},
"grpc_port": ...}`` on one line, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import signal
from typing import cast
from urllib.parse import parse_qsl, urlsplit

import grpc
from grpc_reflection.v1alpha import reflection

from bench import quote
from bench.procs import run_loop
from bench.scenarios import DELAY_METHOD, HTTP_UPSTREAMS, SICK_ENDPOINT, SICK_MS

# A product-sized answer, so bodies are copied as they would be.
BODY = json.dumps(
    {"sku": "A-1042", "name": "Trail running shoe", "price": "129.00", "tags": ["x"] * 40}
).encode()


_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
)


class DelayProtocol(asyncio.Protocol):
    """``GET /delay/{ms}[?slow_pct=P&slow_ms=S]`` over HTTP/1.1 keep-alive, answered after
    the delay with BODY.

    Written on asyncio's Protocol rather than aiohttp.web because the upstreams share one CPU
    with the load generator: at full load an aiohttp.web app became what limited every side
    alike. It serves what the benchmark's clients send (aiohttp's client: GET, no body, one
    request at a time per connection) and nothing else.
    """

    def __init__(self, rng: random.Random, sick_ms: float | None = None) -> None:
        self._rng = rng
        self._sick = None if sick_ms is None else sick_ms / 1000  # every request takes this
        self._loop = asyncio.get_running_loop()
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None  # pending answers are dropped: the client went away

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            target = head.split(b" ", 2)[1].decode("ascii")
            self._loop.call_later(self._delay(target), self._answer)

    def _delay(self, target: str) -> float:
        if self._sick is not None:
            return self._sick
        parts = urlsplit(target)
        seconds = float(parts.path.removeprefix("/delay/")) / 1000
        if parts.query:
            query = dict(parse_qsl(parts.query))
            if self._rng.random() * 100 < float(query.get("slow_pct", "0")):
                seconds = float(query.get("slow_ms", "0")) / 1000
        return seconds

    def _answer(self) -> None:
        if self._transport is not None:
            self._transport.write(_RESPONSE)


async def _grpc_delay(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await asyncio.sleep(float(request.decode("ascii")) / 1000)
    return BODY


async def _quote(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    asked = quote.message_class("QuoteRequest").FromString(request)
    await asyncio.sleep(asked.delay_ms / 1000)
    return quote.answer()


def grpc_server() -> grpc.aio.Server:
    server = grpc.aio.server()
    service, method = DELAY_METHOD.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(_grpc_delay)}
    )
    quotes = grpc.method_handlers_generic_handler(
        quote.SERVICE, {"Get": grpc.unary_unary_rpc_method_handler(_quote)}
    )
    server.add_generic_rpc_handlers((handler, quotes))
    # The typed service's reflection (grpcio-reflection's, v1alpha), as a real upstream's.
    reflection.enable_server_reflection(
        (quote.SERVICE, reflection.SERVICE_NAME), server, pool=quote.pool()
    )
    return server


async def serve(seed: int) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    http_servers = {
        name: await loop.create_server(
            functools.partial(DelayProtocol, rng, SICK_MS if name == SICK_ENDPOINT else None),
            "127.0.0.1",
            0,
            backlog=1024,
        )
        for name in HTTP_UPSTREAMS
    }
    http_ports = {name: s.sockets[0].getsockname()[1] for name, s in http_servers.items()}
    server = grpc_server()
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"http_ports": http_ports, "grpc_port": grpc_port}), flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(None)
        for http_server in http_servers.values():
            http_server.close()
            await http_server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstreams")
    parser.add_argument("--seed", type=int, default=7)
    run_loop(serve(parser.parse_args().seed))


if __name__ == "__main__":
    main()
