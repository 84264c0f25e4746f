"""Attacks on the HTTP/1.1 and gRPC transports (issue 17: findings 1, 6, 8 and 14), each against
real sockets on loopback: Python's http.server (an upstream that does not read the body of a
GET or DELETE, as many do not), raw asyncio servers, the aggregator itself."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.server as httpserver
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from aggregator.config import UpstreamConfig
from aggregator.errors import TargetFailure
from aggregator.lifecycle import AggregatorServer
from aggregator.request import GrpcRequest, HttpRequest
from aggregator.upstreams.grpc import GrpcUpstream
from aggregator.upstreams.http import MAX_GZIP_MEMBERS, HttpUpstream, TooManyMembers, _decompress
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import collect, http
from tests.upstreams import GrpcUpstream as GrpcTestUpstream
from tests.upstreams import raw_upstream

StartServer = Callable[..., Awaitable[tuple[AggregatorServer, pb_grpc.AggregatorStub]]]
GZIP = 16 + 15  # zlib's wbits for a gzip stream
SMUGGLED = b"GET /admin/secret HTTP/1.1\r\nHost: legacy\r\n\r\n"


# --- an upstream that does not read bodies it does not expect -------------------------------------


@dataclass
class Legacy:
    """Python's http.server speaking HTTP/1.1 with keep-alive, in threads of its own: it answers
    GET and DELETE without reading a body (as the standard library's own handlers do) and
    records every request line it parsed and every connection it accepted."""

    port: int = 0
    requests: list[str] = field(default_factory=list)
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _handler(legacy: Legacy) -> type[httpserver.BaseHTTPRequestHandler]:
    class Handler(httpserver.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10  # a connection the client forgot ends the thread all the same

        def setup(self) -> None:
            super().setup()
            with legacy.lock:
                legacy.connections += 1

        def answer(self) -> None:
            with legacy.lock:
                legacy.requests.append(f"{self.command} {self.path}")
            body = f"{self.command} {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_DELETE = answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class _Server(httpserver.ThreadingHTTPServer):
    daemon_threads = False  # server_close joins every connection's thread: all parsed by then


@contextlib.asynccontextmanager
async def legacy_upstream() -> AsyncIterator[Legacy]:
    legacy = Legacy()
    server = _Server(("127.0.0.1", 0), _handler(legacy))
    legacy.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="legacy upstream")
    thread.start()
    try:
        yield legacy
    finally:
        await asyncio.to_thread(_stop, server, thread)


def _stop(server: _Server, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
async def legacy() -> AsyncIterator[Legacy]:
    async with legacy_upstream() as legacy:
        yield legacy


def upstream_config(legacy: Legacy, methods: list[str]) -> dict[str, Any]:
    return {
        "kind": "http",
        "url": legacy.url,
        "allowed_methods": methods,
        "path_prefixes": ["/public/"],
    }


async def aggregate(stub: pb_grpc.AggregatorStub, target: pb.Target) -> pb.TargetResult | str:
    """The target's result, or the call's status and message when the call was refused."""
    results, code, details, _ = await collect(
        stub.Aggregate(pb.AggregateRequest(targets=[target]), timeout=5)
    )
    return results[0] if results else f"{code.name}: {details}"


async def test_a_body_on_a_get_never_reaches_an_upstream_that_does_not_read_it(
    start_server: StartServer, legacy: Legacy
) -> None:
    aggregator, stub = await start_server(legacy=upstream_config(legacy, ["GET"]))
    attack = await aggregate(stub, http("a", "/public/x", "legacy", body=SMUGGLED))
    assert isinstance(attack, str) or attack.outcome != pb.OUTCOME_OK
    victim = await aggregate(stub, http("v", "/public/y", "legacy"))
    assert not isinstance(victim, str)
    assert (victim.outcome, victim.body) == (pb.OUTCOME_OK, b"GET /public/y")
    await aggregator.drain()  # every connection closed: the upstream has parsed all it got
    await asyncio.to_thread(lambda: None)
    assert "GET /admin/secret" not in legacy.requests


async def test_a_body_on_a_method_without_one_is_refused_by_the_transport_itself(
    legacy: Legacy,
) -> None:
    upstream = HttpUpstream(UpstreamConfig(name="legacy", kind="http", url=legacy.url))
    try:
        for method in ("GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"):
            request = HttpRequest(method, "/public/x", (), (), SMUGGLED)
            with pytest.raises(TargetFailure) as caught:
                await upstream.call(request, 2.0, "rid")
            assert caught.value.outcome == pb.OUTCOME_ERROR
            assert caught.value.sentence == (
                f"refused: a {method} request to legacy never carries a body "
                "(an upstream that does not read it would take it for another request)"
            )
        reply = await upstream.call(HttpRequest("GET", "/public/y", (), (), None), 2.0, "rid")
        assert reply.body == b"GET /public/y"
    finally:
        await upstream.aclose()
    assert legacy.requests == ["GET /public/y"]


async def test_a_delete_with_a_body_closes_its_connection_and_smuggles_nothing(
    start_server: StartServer, legacy: Legacy
) -> None:
    aggregator, stub = await start_server(legacy=upstream_config(legacy, ["GET", "DELETE"]))
    deleted = await aggregate(
        stub, http("d", "/public/x", "legacy", method="DELETE", body=SMUGGLED)
    )
    assert not isinstance(deleted, str)
    assert (deleted.outcome, deleted.body) == (pb.OUTCOME_OK, b"DELETE /public/x")
    for path in ("/public/y", "/public/z"):  # the second reuses the first's connection
        victim = await aggregate(stub, http("v", path, "legacy"))
        assert not isinstance(victim, str)
        assert (victim.outcome, victim.body) == (pb.OUTCOME_OK, f"GET {path}".encode())
    await aggregator.drain()
    assert legacy.requests == ["DELETE /public/x", "GET /public/y", "GET /public/z"]
    assert legacy.connections == 2


# --- late bytes after an answer (finding 14) ------------------------------------------------------


async def test_a_fake_answer_after_a_real_one_never_reaches_the_next_caller(
    start_server: StartServer,
) -> None:
    fake = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nFAKE"
    first = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"
    async with raw_upstream({"/first": [first, fake], "/second": [second]}) as raw:
        _, stub = await start_server(raw={"kind": "http", "url": raw.url})
        answers = []
        for path in ("/first", "/second", "/second"):
            result = await aggregate(stub, http("t", path, "raw"))
            assert not isinstance(result, str)
            answers.append(result.body)
    assert answers == [b"first", b"second", b"second"]
    assert raw.connections == 2  # the connection with the fake answer was dropped, once


# --- many-member gzip (finding 8) -----------------------------------------------------------------


def least_time(run: Callable[[], object], times: int = 5) -> float:
    """The shortest of a few runs: what the work costs when other processes leave the core."""
    spent = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        spent.append(time.perf_counter() - start)
    return min(spent)


async def test_a_body_of_52000_empty_gzip_members_is_refused_at_once() -> None:
    member = gzip.compress(b"", mtime=0)
    body = member * (1024 * 1024 // len(member))  # 1 MiB, some 52,000 members
    response = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    async with raw_upstream({"/many": [response + body]}) as raw:
        upstream = HttpUpstream(
            UpstreamConfig(name="up", kind="http", url=raw.url, max_response_bytes=2 * len(body))
        )
        try:
            with pytest.raises(TargetFailure) as caught:
                await upstream.call(HttpRequest("GET", "/many", (), (), None), 5.0, "rid")
        finally:
            await upstream.aclose()
    assert caught.value.sentence == (
        f"up sent a gzip body of more than {MAX_GZIP_MEMBERS} members (concatenated gzip streams)"
    )
    assert caught.value.protocol_error
    assert least_time(lambda: _refused(body)) < 0.05  # 0.73 s before


def _refused(body: bytes) -> None:
    with pytest.raises(TooManyMembers):
        _decompress(body, GZIP, 4 * len(body))


def test_decoding_gzip_members_is_linear_in_the_body() -> None:
    """Twice the members (each padded with zeros, so twice the body) take about twice as long,
    not four times, and no member copies the rest of the body (unused_data.lstrip() did)."""
    member = gzip.compress(b"data", mtime=0) + bytes(256 * 1024)
    half = member * (MAX_GZIP_MEMBERS // 2)
    whole = half * 2
    tracemalloc.start()
    try:
        assert _decompress(whole, GZIP, len(whole)) == b"data" * MAX_GZIP_MEMBERS
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # 32 MiB before: the rest of the body, copied twice
    short, long = [], []
    for _ in range(7):  # interleaved: both sizes see the same load of the machine
        short.append(least_time(lambda: _decompress(half, GZIP, len(whole)), 1))
        long.append(least_time(lambda: _decompress(whole, GZIP, len(whole)), 1))
    assert min(long) < 3.5 * min(short), (short, long)  # 4 to 4.7 times before, 2 now


# --- caches of caller data (finding 6, the transport's part) --------------------------------------


async def test_long_and_many_paths_leave_the_target_cache_bounded(legacy: Legacy) -> None:
    upstream = HttpUpstream(UpstreamConfig(name="up", kind="http", url=legacy.url))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(25):  # the attack of the issue: 25 calls, 1 MB paths (414 from the upstream)
            path = f"/{n}/" + "a" * 1_000_000
            reply = await upstream.call(HttpRequest("GET", path, (), (), None), 5.0, "rid")
            assert reply.http_status == 414
        held = tracemalloc.get_traced_memory()[0] - before
        for n in range(5000):
            upstream._target(f"/{n}/" + "b" * 200)
    finally:
        tracemalloc.stop()
        await upstream.aclose()
    assert held < 4_000_000, held  # 25 paths escaped and kept took over 50 MB
    assert len(upstream._targets) <= 4096
    assert sum(len(path) + len(target) for path, target in upstream._targets.items()) <= 256 * 1024
    assert "chars]" in repr(upstream)


async def test_long_and_many_grpc_methods_leave_the_method_cache_bounded(
    rpc: GrpcTestUpstream,
) -> None:
    upstream = GrpcUpstream(UpstreamConfig(name="rpc", kind="grpc", address=rpc.address))
    try:
        for n in range(25):
            method = f"/pkg.S{n}/" + "M" * 100_000
            with contextlib.suppress(TargetFailure):
                await upstream.call(GrpcRequest(method, b"", ()), 2.0, "rid")
        assert repr(upstream).endswith("[0 methods cached, 0 chars]>")
        for n in range(3000):
            upstream._method(f"/pkg.Service/Method{n}" + "x" * 100)
    finally:
        await upstream.aclose()
    assert len(upstream._methods) <= 1024
    assert sum(len(method) for method in upstream._methods) <= 64 * 1024


async def test_a_grpc_method_not_cached_still_works(rpc: GrpcTestUpstream) -> None:
    upstream = GrpcUpstream(UpstreamConfig(name="rpc", kind="grpc", address=rpc.address))
    try:
        reply = await upstream.call(
            GrpcRequest("/test.Upstream/Nope" + "x" * 300, b"", ()), 2.0, "r"
        )
    finally:
        await upstream.aclose()
    assert reply.grpc_code == grpc.StatusCode.UNIMPLEMENTED.value[0]
