"""Real upstreams for behaviour tests, on 127.0.0.1 and free ports, told what to do per request.

REST (aiohttp): ``/delay/{ms}``, ``/status/{code}``, ``/hang``, ``/reset``, ``/echo``,
``/text``. gRPC (grpc.aio, bytes in and out) service ``test.Upstream``: ``Echo``, ``Delay``
(request = milliseconds as ASCII), ``Fail`` (request = status code number), ``Hang``.
Both record what reached them, so tests assert on the upstream's side of the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web


@dataclass
class Recorder:
    """What an upstream saw: requests, concurrency, and hangs that ended by cancellation."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    arrived: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    hanging: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    cancelled: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    counts: dict[str, int] = field(default_factory=dict)
    failing: bool = False  # /toggle answers 503 while set
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # /gate waits for it

    def count(self, key: str) -> int:
        """Counts a call under ``key``; returns how many came before this one."""
        seen = self.counts.get(key, 0)
        self.counts[key] = seen + 1
        return seen

    def enter(self, seen: dict[str, Any]) -> None:
        self.requests.append(seen)
        self.arrived.put_nowait(None)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)

    def leave(self) -> None:
        self.inflight -= 1

    async def hang(self) -> None:
        self.hanging.put_nowait(None)
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.put_nowait(None)


@dataclass
class RestUpstream:
    port: int
    recorder: Recorder
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class GrpcUpstream:
    port: int
    recorder: Recorder

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _rest_app(recorder: Recorder) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        recorder.enter(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": {name.lower(): value for name, value in request.headers.items()},
                "body": body,
                # The connection it came on: tests count connections opened to the upstream.
                "peer": request.transport.get_extra_info("peername") if request.transport else None,
            }
        )
        try:
            return await handler(request)  # type: ignore[no-any-return]
        finally:
            recorder.leave()

    async def delay(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.json_response({"delay_ms": int(request.match_info["ms"])})

    async def loaded(request: web.Request) -> web.Response:
        """Takes ms for each request in flight here: latency that grows with load."""
        await asyncio.sleep(int(request.match_info["ms"]) * recorder.inflight / 1000)
        return web.json_response({"inflight": recorder.inflight})

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        headers = (
            {"Retry-After": request.query["retry_after"]} if "retry_after" in request.query else {}
        )
        return web.json_response({"status": code}, status=code, headers=headers)

    async def flaky(request: web.Request) -> web.Response:
        """Answers 503 (or ?code=) to the first n calls of a key, then 200."""
        key, failures = request.match_info["key"], int(request.match_info["n"])
        if recorder.count(key) < failures:
            code = int(request.query.get("code", "503"))
            headers = (
                {"Retry-After": request.query["retry_after"]}
                if "retry_after" in request.query
                else {}
            )
            return web.json_response({"failing": key}, status=code, headers=headers)
        return web.json_response({"ok": key})

    async def json_body(request: web.Request) -> web.Response:
        """Answers the JSON given in ?body= (with ?cc= as Cache-Control)."""
        headers = {"Cache-Control": request.query["cc"]} if "cc" in request.query else {}
        return web.Response(
            text=request.query.get("body", "{}"), content_type="application/json", headers=headers
        )

    async def count(request: web.Request) -> web.Response:
        """Answers how many calls its key has had (with ?cc= as Cache-Control)."""
        headers = {"Cache-Control": request.query["cc"]} if "cc" in request.query else {}
        n = recorder.count(request.match_info["key"]) + 1
        return web.json_response({"n": n}, headers=headers)

    async def toggle(request: web.Request) -> web.Response:
        n = recorder.count(request.match_info["key"]) + 1
        if recorder.failing:
            return web.json_response({"n": n}, status=503)
        return web.json_response({"n": n})

    async def gate(request: web.Request) -> web.Response:
        """Counts, then waits until the test opens recorder.gate."""
        n = recorder.count(request.match_info["key"]) + 1
        try:
            await recorder.gate.wait()
        except asyncio.CancelledError:
            recorder.cancelled.put_nowait(None)
            raise
        return web.json_response({"n": n})

    async def slow_first(request: web.Request) -> web.Response:
        """The first call of a key hangs (until cancelled); later ones answer at once."""
        if recorder.count(request.match_info["key"]) == 0:
            await recorder.hang()
        return web.json_response({"fast": True})

    async def hang(request: web.Request) -> web.Response:
        await recorder.hang()
        raise AssertionError("unreachable")

    async def reset(request: web.Request) -> web.Response:
        return await reset_connection(request)

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": (await request.read()).decode(),
            }
        )

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="plain words", content_type="text/plain")

    async def set_cookie(request: web.Request) -> web.Response:
        response = web.json_response({"set": request.query.get("value", "")})
        response.set_cookie("session", request.query.get("value", ""), path="/")
        return response

    app = web.Application(middlewares=[record])
    app.router.add_route("*", "/delay/{ms}", delay)
    app.router.add_route("*", "/loaded/{ms}", loaded)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_route("*", "/flaky/{key}/{n}", flaky)
    app.router.add_route("*", "/json", json_body)
    app.router.add_route("*", "/count/{key}", count)
    app.router.add_route("*", "/toggle/{key}", toggle)
    app.router.add_route("*", "/gate/{key}", gate)
    app.router.add_route("*", "/slow-first/{key}", slow_first)
    app.router.add_route("*", "/hang", hang)
    app.router.add_route("*", "/reset", reset)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_route("*", "/text", text)
    app.router.add_route("*", "/set-cookie", set_cookie)
    return app


@contextlib.asynccontextmanager
async def rest_upstream(host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[RestUpstream]:
    """The test REST app on ``host``: a loopback address (127.0.0.2 is one too, on Linux)."""
    recorder = Recorder()
    runner = web.AppRunner(_rest_app(recorder), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        yield RestUpstream(port=runner.addresses[0][1], recorder=recorder, host=host)
    finally:
        await runner.cleanup()


async def reset_connection(request: web.Request) -> web.Response:
    """Answers nothing: the connection is reset (RST, not FIN) under the request."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    # SO_LINGER 0: close() sends RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _grpc_handler(recorder: Recorder) -> grpc.GenericRpcHandler:
    def seen(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        recorder.enter(
            {
                "request": request,
                "metadata": dict(context.invocation_metadata() or ()),
                "time_remaining": context.time_remaining(),
            }
        )

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen(request, context)
        recorder.leave()
        return request

    async def delay(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen(request, context)
        try:
            await asyncio.sleep(int(request) / 1000)
        finally:
            recorder.leave()
        return request

    async def fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen(request, context)
        recorder.leave()
        code = next(c for c in grpc.StatusCode if c.value[0] == int(request))
        await context.abort(code, f"told to fail with {code.name}")
        raise AssertionError("unreachable")

    async def hang(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        seen(request, context)
        try:
            await recorder.hang()
        finally:
            recorder.leave()
        raise AssertionError("unreachable")

    async def fail_first(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        """Request "key:n:code": fails the first n calls of key with code, then echoes."""
        seen(request, context)
        recorder.leave()
        key, failures, number = request.decode().split(":")
        if recorder.count(key) < int(failures):
            code = next(c for c in grpc.StatusCode if c.value[0] == int(number))
            await context.abort(code, f"failing {key}")
        return request

    methods = {"Echo": echo, "Delay": delay, "Fail": fail, "Hang": hang, "FailFirst": fail_first}
    return grpc.method_handlers_generic_handler(
        "test.Upstream",
        {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in methods.items()},
    )


@contextlib.asynccontextmanager
async def grpc_upstream() -> AsyncIterator[GrpcUpstream]:
    recorder = Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_grpc_handler(recorder),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield GrpcUpstream(port=port, recorder=recorder)
    finally:
        await server.stop(None)


_HELD_PORTS: list[socket.socket] = []


def free_port() -> int:
    """A loopback port free a moment ago, for a server the test starts (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused_port() -> int:
    """A loopback port nothing listens on: bound and never listened on, and held for the rest
    of the session, so no server started later can take it (connections to it are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD_PORTS.append(sock)
    return int(sock.getsockname()[1])


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full, so new connections hang in SYN-SENT."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(4):  # fill the queue; never accepted
            client = stack.enter_context(socket.socket())
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
        yield port


def echo_json(result_body: bytes) -> dict[str, Any]:
    return json.loads(result_body)  # type: ignore[no-any-return]


# --- TLS upstreams and hostile raw-socket upstreams (trust and hardening tests) ---------------


@contextlib.asynccontextmanager
async def tls_rest_upstream(ssl_context: Any) -> AsyncIterator[RestUpstream]:
    """The REST upstream above, served over TLS with ``ssl_context`` (url is https://)."""
    recorder = Recorder()
    runner = web.AppRunner(_rest_app(recorder), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        yield RestUpstream(port=runner.addresses[0][1], recorder=recorder)
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def tls_grpc_upstream(credentials: grpc.ServerCredentials) -> AsyncIterator[GrpcUpstream]:
    """The gRPC upstream above, served over TLS with ``credentials``."""
    recorder = Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_grpc_handler(recorder),))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield GrpcUpstream(port=port, recorder=recorder)
    finally:
        await server.stop(None)


Script = list[bytes | float | None]


@dataclass
class RawUpstream:
    """A TCP server answering each request path with a script of raw writes and pauses:
    bytes are written, a float sleeps that many seconds, None closes the connection."""

    port: int
    scripts: dict[str, Script]
    requests: list[str] = field(default_factory=list)
    connections: int = 0
    open_connections: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _raw_connection(
    upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    upstream.connections += 1
    upstream.open_connections += 1
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1].decode()
            upstream.requests.append(path)
            for step in upstream.scripts[path]:
                if step is None:
                    return
                if isinstance(step, float):
                    await asyncio.sleep(step)
                    continue
                writer.write(step)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        upstream.open_connections -= 1
        writer.close()


@contextlib.asynccontextmanager
async def raw_upstream(scripts: dict[str, Script]) -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream(port=0, scripts=scripts)
    handlers: set[asyncio.Task[None]] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await _raw_connection(upstream, reader, writer)
        finally:
            handlers.discard(task)

    server = await asyncio.start_server(connected, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    try:
        yield upstream
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await server.wait_closed()
