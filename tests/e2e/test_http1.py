"""The REST upstreams' HTTP/1.1 transport (upstreams/http1.py) and HttpUpstream over it, against
a TCP server on loopback that the test drives byte by byte: each accepted connection is a Peer
the test reads requests from, answers, half-closes or resets, so every wait is on something the
other side did (the clock only where it is the subject: the keep-alive sweep, the connect
timeout)."""

from __future__ import annotations

import asyncio
import gc
import gzip
import socket
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from aggregator.config import UpstreamConfig
from aggregator.errors import TargetFailure
from aggregator.request import HttpRequest
from aggregator.timers import SYSTEM_CLOCK, Clock
from aggregator.upstreams import Reply
from aggregator.upstreams.http import HttpUpstream
from aggregator.upstreams.http1 import Pool
from aggregator.upstreams.http1_answers import (
    BrokenResponse,
    Closed,
    Disconnected,
    Response,
    TooLarge,
)
from aggregator.v1 import aggregator_pb2 as pb
from tests.clocks import ManualClock
from tests.upstreams import refused_port, unanswered_port

T = TypeVar("T")

WAIT = 5.0  # the bound on any wait for the other side (each takes milliseconds)
CAP = 1000  # the response cap the pool is given
GET = b"GET / HTTP/1.1\r\nHost: origin\r\n\r\n"


def head(status: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    return "\r\n".join((f"{version} {status}", *headers, "", "")).encode()


def ok(body: bytes = b"hello", *headers: str) -> bytes:
    return head("200 OK", f"Content-Length: {len(body)}", *headers) + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class Peer:
    """The server's end of one accepted connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def request(self) -> bytes:
        """One whole request as it arrived: head, and the body its Content-Length announces."""
        async with asyncio.timeout(WAIT):
            request = await self.reader.readuntil(b"\r\n\r\n")
            for line in request.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    request += await self.reader.readexactly(int(line.split(b":")[1]))
            return request

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def ended(self) -> bytes:
        """Waits until the client has closed the connection (FIN or RST); returns what it sent
        after the last request read."""
        async with asyncio.timeout(WAIT):
            try:
                return await self.reader.read()
            except ConnectionResetError:
                return b""

    def reset(self) -> None:
        """Closes with RST instead of FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


@dataclass
class Origin:
    """A TCP server on 127.0.0.1 whose connections the test takes as they are accepted."""

    port: int = 0
    connections: int = 0
    accepted: asyncio.Queue[Peer] = field(default_factory=asyncio.Queue)
    peers: list[Peer] = field(default_factory=list)

    def connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        self.connections += 1
        self.peers.append(peer)
        self.accepted.put_nowait(peer)

    async def accept(self) -> Peer:
        async with asyncio.timeout(WAIT):
            return await self.accepted.get()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    origin = Origin()
    server = await asyncio.start_server(origin.connected, "127.0.0.1", 0)
    origin.port = server.sockets[0].getsockname()[1]
    yield origin
    server.close()
    for peer in origin.peers:
        peer.writer.close()
    await server.wait_closed()


@pytest.fixture
async def pools(origin: Origin) -> AsyncIterator[Callable[..., Pool]]:
    """Makes pools to the origin (closed after the test)."""
    made: list[Pool] = []

    def make(max_idle: int = 10, keepalive: float = 30.0, clock: Clock = SYSTEM_CLOCK) -> Pool:
        pool = Pool("127.0.0.1", origin.port, 1.0, max_idle, keepalive=keepalive, clock=clock)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.aclose()


@pytest.fixture
def pool(pools: Callable[..., Pool]) -> Pool:
    return pools()


@pytest.fixture
async def upstreams(origin: Origin) -> AsyncIterator[Callable[..., HttpUpstream]]:
    """Makes HttpUpstreams named ``up`` on ``http://127.0.0.1:{port}/base`` (closed after)."""
    made: list[HttpUpstream] = []

    def make(**config: Any) -> HttpUpstream:
        config.setdefault("url", f"http://127.0.0.1:{origin.port}/base")
        upstream = HttpUpstream(UpstreamConfig(name="up", kind="http", **config))
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        await upstream.aclose()


def fetch(
    pool: Pool,
    data: bytes = GET,
    head_only: bool = False,
    cap: int = CAP,
    idempotent: bool = True,
) -> Coroutine[Any, Any, Response]:
    return pool.request(data, head_only=head_only, cap=cap, idempotent=idempotent)


async def outcome(task: asyncio.Task[T]) -> T:
    """The task's result (or its exception raised), within WAIT; cancelled if it takes longer."""
    try:
        async with asyncio.timeout(WAIT):
            return await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])


async def served(
    origin: Origin, peer: Peer | None, reply: bytes, call: Coroutine[Any, Any, T]
) -> tuple[T, Peer, bytes]:
    """Runs ``call`` while the server reads its request on ``peer`` (None: on the next new
    connection) and answers ``reply``; returns the call's result, the peer and the request."""
    task = asyncio.create_task(call)
    try:
        peer = peer or await origin.accept()
        request = await peer.request()
        peer.send(reply)
    finally:
        result = await outcome(task)
    return result, peer, request


async def held(pool: Pool, origin: Origin) -> tuple[asyncio.Task[Response], Peer]:
    """A GET on a new connection whose request the server has read and holds the answer to."""
    task = asyncio.create_task(fetch(pool))
    peer = await origin.accept()
    await peer.request()
    return task, peer


def state(origin: Origin, open_: int, idle: int) -> str:
    return f"<Pool 127.0.0.1:{origin.port} [{open_} open, {idle} idle]>"


# --- keep-alive and framing --------------------------------------------------------------------


async def test_sequential_requests_share_one_kept_alive_connection(
    pool: Pool, origin: Origin
) -> None:
    assert repr(pool) == state(origin, 0, 0)
    peer = None
    for n in range(5):
        body = b"answer %d" % n
        response, peer, request = await served(origin, peer, ok(body), fetch(pool))
        assert response == Response(200, "OK", {b"content-length": b"8"}, body)
        assert request == GET
        assert repr(pool) == state(origin, 1, 1)
    assert origin.connections == 1


async def test_repr_counts_a_connection_in_use_as_open_and_not_idle(
    pool: Pool, origin: Origin
) -> None:
    task, peer = await held(pool, origin)
    assert repr(pool) == state(origin, 1, 0)
    peer.send(ok())
    await outcome(task)
    assert repr(pool) == state(origin, 1, 1)


async def test_only_the_headers_the_upstream_layer_reads_are_kept_repeats_joined(
    pool: Pool, origin: Origin
) -> None:
    reply = ok(
        b"{}",
        "Content-Type: application/json",
        "Cache-Control: max-age=5",
        "cache-control: private",
        "Retry-After: 3",
        "Content-Encoding: identity",
        "X-Other: dropped",
        "Set-Cookie: dropped",
    )
    response, _, _ = await served(origin, None, reply, fetch(pool))
    assert response.headers == {
        b"content-length": b"2",
        b"content-type": b"application/json",
        b"cache-control": b"max-age=5, private",
        b"retry-after": b"3",
        b"content-encoding": b"identity",
    }


@pytest.mark.parametrize(
    ("reply", "reused"),
    [
        (head("200 OK", "Content-Length: 5", "Connection: close") + b"hello", False),
        (head("200 OK", "Content-Length: 5", version="HTTP/1.0") + b"hello", False),
        (
            head("200 OK", "Content-Length: 5", "Connection: keep-alive", version="HTTP/1.0")
            + b"hello",
            True,
        ),
        (head("200 OK", "Content-Length: 5", "Connection: keep-alive") + b"hello", True),
    ],
    ids=["close", "http/1.0", "http/1.0-keep-alive", "keep-alive"],
)
async def test_a_connection_is_reused_only_when_the_response_allows_it(
    pool: Pool, origin: Origin, reply: bytes, reused: bool
) -> None:
    response, peer, _ = await served(origin, None, reply, fetch(pool))
    assert (response.status, response.body) == (200, b"hello")
    if not reused:
        assert await peer.ended() == b""  # closed by the client, nothing more sent on it
        assert repr(pool) == state(origin, 0, 0)
    response, next_peer, _ = await served(
        origin, peer if reused else None, ok(b"next"), fetch(pool)
    )
    assert response.body == b"next"
    assert (next_peer is peer) == reused
    assert origin.connections == (1 if reused else 2)


async def test_a_body_delimited_by_the_connections_end_is_read_whole(
    pool: Pool, origin: Origin
) -> None:
    task, peer = await held(pool, origin)
    peer.send(head("200 OK", "Content-Type: text/plain"))
    peer.send(b"part one, ")
    peer.send(b"part two")
    peer.writer.write_eof()
    response = await outcome(task)
    assert response == Response(200, "OK", {b"content-type": b"text/plain"}, b"part one, part two")
    assert await peer.ended() == b""
    assert repr(pool) == state(origin, 0, 0)


async def test_a_chunked_body_is_joined_and_the_connection_reused(
    pool: Pool, origin: Origin
) -> None:
    task, peer = await held(pool, origin)
    peer.send(head("200 OK", "Transfer-Encoding: chunked"))
    peer.send(chunk(b"hello"))
    peer.send(b"1;name=value\r\n,\r\n")  # a chunk extension, ignored
    peer.send(chunk(b" wor") + chunk(b"ld") + b"0\r\n\r\n")
    response = await outcome(task)
    assert (response.status, response.body) == (200, b"hello, world")
    response, _, _ = await served(origin, peer, ok(b"next"), fetch(pool))
    assert response.body == b"next"
    assert origin.connections == 1


async def test_trailers_after_a_chunked_body_are_not_taken_for_headers(
    pool: Pool, origin: Origin
) -> None:
    reply = (
        head("200 OK", "Transfer-Encoding: chunked", "Content-Type: text/plain")
        + chunk(b"hi")
        + b"0\r\nContent-Type: evil\r\nContent-Encoding: gzip\r\n\r\n"
    )
    response, _, _ = await served(origin, None, reply, fetch(pool))
    assert response.body == b"hi"
    assert response.headers == {b"content-type": b"text/plain"}


@pytest.mark.parametrize("length", [5, 10 * CAP])
async def test_a_head_response_ends_with_its_head_and_closes_the_connection(
    pool: Pool, origin: Origin, length: int
) -> None:
    request = b"HEAD / HTTP/1.1\r\nHost: origin\r\n\r\n"
    reply = head("200 OK", f"Content-Length: {length}", "Content-Type: text/plain")
    response, peer, sent = await served(origin, None, reply, fetch(pool, request, head_only=True))
    assert sent == request
    assert response == Response(
        200, "OK", {b"content-length": b"%d" % length, b"content-type": b"text/plain"}, b""
    )
    # Its body never comes, so nothing else on the connection could be framed: not reused.
    assert await peer.ended() == b""
    response, next_peer, _ = await served(origin, None, ok(), fetch(pool))
    assert next_peer is not peer
    assert response.body == b"hello"


@pytest.mark.parametrize(
    "reply",
    [
        head("204 No Content"),
        head("204 No Content", "Content-Length: 0"),
        head("304 Not Modified", 'ETag: "v1"'),
        head("304 Not Modified", "Content-Length: 5"),  # the length a 200 would have
    ],
    ids=["204", "204-length-0", "304", "304-length"],
)
async def test_no_content_and_not_modified_end_with_their_head_and_keep_the_connection(
    pool: Pool, origin: Origin, reply: bytes
) -> None:
    response, peer, _ = await served(origin, None, reply, fetch(pool))
    assert response.status in (204, 304)
    assert response.body == b""
    assert repr(pool) == state(origin, 1, 1)
    response, _, _ = await served(origin, peer, ok(b"next"), fetch(pool))
    assert response.body == b"next"
    assert origin.connections == 1


async def test_a_not_modified_announcing_a_large_representation_is_not_too_large(
    pool: Pool, origin: Origin
) -> None:
    reply = head("304 Not Modified", f"Content-Length: {10 * CAP}")
    response, _, _ = await served(origin, None, reply, fetch(pool))
    assert (response.status, response.body) == (304, b"")


# --- the response cap ---------------------------------------------------------------------------


async def test_a_declared_length_over_the_cap_is_refused_before_the_body(
    pool: Pool, origin: Origin
) -> None:
    task, peer = await held(pool, origin)
    peer.send(head("200 OK", f"Content-Length: {CAP + 1}"))  # and never a byte of the body
    with pytest.raises(TooLarge) as caught:
        await outcome(task)
    assert (caught.value.status, caught.value.what) == (200, f"announced {CAP + 1} bytes")
    assert await peer.ended() == b""
    assert repr(pool) == state(origin, 0, 0)


def framed(framing: str, body: bytes) -> bytes:
    if framing == "length":
        return ok(body)
    if framing == "chunked":
        chunks = [body[at : at + 400] for at in range(0, len(body), 400)]
        return (
            head("200 OK", "Transfer-Encoding: chunked")
            + b"".join(map(chunk, chunks))
            + (b"0\r\n\r\n")
        )
    return head("200 OK") + body  # ended by the connection's end


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_a_body_of_exactly_the_cap_is_read(pool: Pool, origin: Origin, framing: str) -> None:
    task, peer = await held(pool, origin)
    peer.send(framed(framing, b"c" * CAP))
    if framing == "close":
        peer.writer.write_eof()
    response = await outcome(task)
    assert response.body == b"c" * CAP


@pytest.mark.parametrize("framing", ["chunked", "close"])
async def test_an_undeclared_body_over_the_cap_is_too_large_as_it_passes_it(
    pool: Pool, origin: Origin, framing: str
) -> None:
    task, peer = await held(pool, origin)
    peer.send(framed(framing, b"c" * (CAP + 1)))  # the connection stays open
    with pytest.raises(TooLarge) as caught:
        await outcome(task)
    assert (caught.value.status, caught.value.what) == (200, f"sent more than {CAP} bytes")
    assert await peer.ended() == b""
    assert repr(pool) == state(origin, 0, 0)


# --- broken responses ---------------------------------------------------------------------------


@pytest.mark.parametrize("line_length", [8190, 8191])
async def test_a_header_line_over_8190_bytes_is_a_broken_response(
    pool: Pool, origin: Origin, line_length: int
) -> None:
    line = "X-Big: " + "v" * (line_length - len("X-Big: "))
    call = fetch(pool)
    reply = ok(b"ok", line)
    if line_length <= 8190:
        response, _, _ = await served(origin, None, reply, call)
        assert response.body == b"ok"
        return
    with pytest.raises(BrokenResponse, match=r"^a response header is too long$"):
        await served(origin, None, reply, call)
    assert await origin.peers[0].ended() == b""


async def test_a_head_over_64_kib_is_a_broken_response(pool: Pool, origin: Origin) -> None:
    reply = ok(b"ok", *(f"X-Part-{n}: {'v' * 8000}" for n in range(9)))
    with pytest.raises(BrokenResponse, match=r"^a response header is too long$"):
        await served(origin, None, reply, fetch(pool))


@pytest.mark.parametrize(
    "start",
    [b"HTTP/1.1 200 OK\r\nX-Big: ", b"HTTP/1.1 200 OK\r\nX-Big", b"HTTP/1.1 200 "],
    ids=["value", "name", "reason"],
)
async def test_an_endless_head_is_refused_before_it_ends(
    pool: Pool, origin: Origin, start: bytes
) -> None:
    task, peer = await held(pool, origin)
    peer.send(start + b"v" * (100 * 1024))  # past the line and head limits, never ended...
    await peer.writer.drain()
    peer.writer.write_eof()  # ...so that an implementation that waits for the end ends too
    with pytest.raises(BrokenResponse):
        await outcome(task)


@pytest.mark.parametrize(
    "reply",
    [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 2x0 OK\r\n\r\n", b"\x16\x03\x01\x02\x00\x01"],
    ids=["ssh", "bad-status", "tls-hello"],
)
async def test_garbage_instead_of_http_is_a_broken_response(
    pool: Pool, origin: Origin, reply: bytes
) -> None:
    with pytest.raises(BrokenResponse):
        await served(origin, None, reply, fetch(pool))
    assert await origin.peers[0].ended() == b""
    assert repr(pool) == state(origin, 0, 0)


# --- stale kept-alive connections ---------------------------------------------------------------


@pytest.mark.parametrize("idempotent", [True, False])
async def test_a_connection_the_server_closed_while_idle_is_not_used(
    pool: Pool, origin: Origin, idempotent: bool
) -> None:
    _, peer, _ = await served(origin, None, ok(), fetch(pool))
    peer.writer.write_eof()
    assert await peer.ended() == b""  # the client saw the end and closed its side
    assert repr(pool) == state(origin, 0, 0)
    response, _, _ = await served(origin, None, ok(b"fresh"), fetch(pool, idempotent=idempotent))
    assert response.body == b"fresh"
    assert origin.connections == 2


async def stale(pool: Pool, origin: Origin, idempotent: bool, how: str) -> asyncio.Task[Response]:
    """A request on a kept-alive connection that the server reads and closes ("fin" or "rst")
    without answering: the race of a request crossing the server's idle close."""
    _, peer, _ = await served(origin, None, ok(), fetch(pool))
    task = asyncio.create_task(fetch(pool, idempotent=idempotent))
    assert await peer.request() == GET
    if how == "rst":
        peer.reset()
    else:
        peer.writer.close()
    return task


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_an_idempotent_request_the_server_closed_unanswered_goes_again_on_a_new_connection(
    pool: Pool, origin: Origin, how: str
) -> None:
    task = await stale(pool, origin, True, how)
    peer = await origin.accept()
    assert await peer.request() == GET
    peer.send(ok(b"second try"))
    response = await outcome(task)
    assert response.body == b"second try"
    assert origin.connections == 2
    assert repr(pool) == state(origin, 1, 1)


@pytest.mark.parametrize(("how", "cause"), [("fin", type(None)), ("rst", ConnectionResetError)])
async def test_a_request_not_idempotent_the_server_closed_unanswered_is_not_sent_again(
    pool: Pool, origin: Origin, how: str, cause: type[BaseException]
) -> None:
    task = await stale(pool, origin, False, how)
    with pytest.raises(Disconnected) as caught:
        await outcome(task)
    assert not caught.value.answered
    assert isinstance(caught.value.cause, cause)
    assert origin.connections == 1
    assert repr(pool) == state(origin, 0, 0)


async def test_a_kept_alive_connection_broken_off_mid_answer_is_not_tried_again(
    pool: Pool, origin: Origin
) -> None:
    _, peer, _ = await served(origin, None, ok(), fetch(pool))
    task = asyncio.create_task(fetch(pool))
    await peer.request()
    peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")
    await peer.writer.drain()
    peer.writer.close()
    with pytest.raises(Disconnected) as caught:
        await outcome(task)
    assert caught.value.answered
    assert origin.connections == 1


async def test_a_new_connection_closed_unanswered_is_not_tried_again(
    pool: Pool, origin: Origin
) -> None:
    task, peer = await held(pool, origin)
    peer.writer.close()
    with pytest.raises(Disconnected) as caught:
        await outcome(task)
    assert (caught.value.answered, caught.value.cause) == (False, None)
    assert origin.connections == 1


# --- unsolicited bytes --------------------------------------------------------------------------


async def test_bytes_on_an_idle_connection_drop_it(pool: Pool, origin: Origin) -> None:
    _, peer, _ = await served(origin, None, ok(), fetch(pool))
    peer.send(ok(b"nobody asked"))
    assert await peer.ended() == b""
    assert repr(pool) == state(origin, 0, 0)
    response, next_peer, _ = await served(origin, None, ok(b"asked"), fetch(pool))
    assert response.body == b"asked"
    assert next_peer is not peer


async def respond(origin: Origin, peer: Peer | None, reply: bytes) -> Peer:
    """The server's side of one exchange, for a test that awaits the request itself."""
    peer = peer or await origin.accept()
    await peer.request()
    peer.send(reply)
    return peer


async def test_a_connection_broken_by_bytes_after_its_answer_is_not_handed_on(
    pool: Pool, origin: Origin
) -> None:
    server = asyncio.create_task(respond(origin, None, ok(b"ok") + b"GARBAGE"))  # one write
    # Awaited here, not in a task: the next request is taken in the step the answer arrives,
    # before the transport reports the connection lost; it must not get the broken connection.
    assert (await fetch(pool)).body == b"ok"
    fresh = asyncio.create_task(respond(origin, None, ok(b"fresh")))
    assert (await fetch(pool, idempotent=False)).body == b"fresh"
    assert await outcome(server) is not await outcome(fresh)
    assert origin.connections == 2


async def test_an_answer_is_not_changed_by_a_message_after_it_in_the_same_read(
    pool: Pool, origin: Origin
) -> None:
    reply = ok(b"ok", "Content-Type: text/plain") + ok(b"", "Content-Type: evil")  # one write
    response, _, _ = await served(origin, None, reply, fetch(pool))
    assert response == Response(
        200, "OK", {b"content-length": b"2", b"content-type": b"text/plain"}, b"ok"
    )


async def test_a_partial_message_after_an_answer_is_not_taken_for_the_next_answer(
    pool: Pool, origin: Origin
) -> None:
    _, peer, _ = await served(origin, None, ok(b"ok") + b"HTTP/1.1 200 OK\r\nX-Pad: ", fetch(pool))
    task = asyncio.create_task(fetch(pool))
    try:
        await peer.request()
        answering = peer  # still in use: then it must at least not mix the two up
    except (asyncio.IncompleteReadError, ConnectionResetError):
        answering = await origin.accept()  # dropped, as an idle connection with surplus is
        await answering.request()
    answering.send(head("500 Internal Server Error", "Content-Length: 2") + b"no")
    response = await outcome(task)
    assert (response.status, response.reason, response.body) == (
        500,
        "Internal Server Error",
        b"no",
    )


async def test_an_answer_that_arrived_in_the_turn_of_the_next_request_is_not_its_answer(
    pool: Pool, origin: Origin
) -> None:
    _, peer, _ = await served(origin, None, ok(b"first"), fetch(pool))
    fresh = asyncio.create_task(respond(origin, None, ok(b"yours")))
    peer.send(ok(b"not yours"))  # written at once: in the client's socket before its loop turns
    # Awaited here, not in a task: the connection is taken and the request written in this
    # step, before the loop could deliver those bytes to the idle connection.
    assert (await fetch(pool, idempotent=False)).body == b"yours"
    assert await outcome(fresh) is not peer
    assert origin.connections == 2


async def test_a_connection_closed_by_the_server_in_the_same_turn_is_not_used(
    pool: Pool, origin: Origin
) -> None:
    _, peer, _ = await served(origin, None, ok(), fetch(pool))
    fresh = asyncio.create_task(respond(origin, None, ok(b"fresh")))
    peer.writer.write_eof()
    # Not idempotent: the request could not be sent twice, so it must not go out on a
    # connection whose end is already known.
    assert (await fetch(pool, idempotent=False)).body == b"fresh"
    await outcome(fresh)
    assert origin.connections == 2


async def test_the_last_request_closes_its_connection_after_the_answer(
    pool: Pool, origin: Origin
) -> None:
    call = pool.request(GET, head_only=False, cap=CAP, idempotent=True, last=True)
    response, peer, _ = await served(origin, None, ok(b"done"), call)
    assert response.body == b"done"
    assert await peer.ended() == b""
    assert repr(pool) == state(origin, 0, 0)


async def test_an_answer_before_the_whole_request_was_written_closes_the_connection(
    pool: Pool, origin: Origin
) -> None:
    body = b"x" * (64 * 1024 * 1024)  # more than the sockets buffer: the server reads none of it
    data = b"POST / HTTP/1.1\r\nHost: origin\r\nContent-Length: %d\r\n\r\n" % len(body)
    task = asyncio.create_task(fetch(pool, data + body, idempotent=False))
    peer = await origin.accept()
    async with asyncio.timeout(WAIT):
        await peer.reader.readuntil(b"\r\n\r\n")
    peer.send(ok(b"refused early"))
    assert (await outcome(task)).body == b"refused early"
    # The rest of the body would be read as the next request: the connection is not reused,
    # and not kept open to write it either.
    await peer.ended()
    assert repr(pool) == state(origin, 0, 0)
    response, fresh, _ = await served(origin, None, ok(b"next"), fetch(pool))
    assert (response.body, fresh is peer) == (b"next", False)


# --- cancellation -------------------------------------------------------------------------------


@pytest.mark.parametrize("reused", [False, True])
async def test_a_cancelled_request_closes_its_connection(
    pool: Pool, origin: Origin, reused: bool
) -> None:
    peer = None
    if reused:
        _, peer, _ = await served(origin, None, ok(), fetch(pool))
    task = asyncio.create_task(fetch(pool))
    peer = peer or await origin.accept()
    await peer.request()  # and the server holds the answer
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outcome(task)
    assert await peer.ended() == b""
    assert repr(pool) == state(origin, 0, 0)
    response, next_peer, _ = await served(origin, None, ok(b"later"), fetch(pool))
    assert response.body == b"later"
    assert next_peer is not peer


# --- idle connections ---------------------------------------------------------------------------


async def test_idle_connections_are_closed_after_the_keepalive(
    pools: Callable[..., Pool], origin: Origin
) -> None:
    pool = pools(keepalive=0.2)  # long enough for the check that it is idle first
    for _ in range(2):  # the sweep stops with no idle connection left, and starts again
        _, peer, _ = await served(origin, None, ok(), fetch(pool))
        assert repr(pool) == state(origin, 1, 1)
        assert await peer.ended() == b""
        assert repr(pool) == state(origin, 0, 0)
    assert origin.connections == 2


@pytest.mark.parametrize(
    ("keep_alive", "reused"), [("timeout=1", False), ("timeout=5, max=100", True)]
)
async def test_the_upstreams_keep_alive_timeout_is_honoured(
    pool: Pool, origin: Origin, keep_alive: str, reused: bool
) -> None:
    # Kept a second less than the upstream keeps it (so never past it); timeout=1 is not at all.
    _, peer, _ = await served(origin, None, ok(b"a", f"Keep-Alive: {keep_alive}"), fetch(pool))
    if not reused:
        assert await peer.ended() == b""
    response, next_peer, _ = await served(origin, peer if reused else None, ok(b"b"), fetch(pool))
    assert response.body == b"b"
    assert (next_peer is peer) == reused
    assert origin.connections == (1 if reused else 2)


async def test_an_idle_connection_past_its_time_is_never_taken(
    pools: Callable[..., Pool], origin: Origin
) -> None:
    clock = ManualClock()
    pool = pools(keepalive=0.05, clock=clock)
    pool._arm_sweep = lambda: None  # type: ignore[method-assign]  # no sweep to help
    _, peer, _ = await served(origin, None, ok(), fetch(pool))
    assert repr(pool) == state(origin, 1, 1)
    clock.advance(0.06)  # the pool's clock: past the keep-alive
    response, next_peer, _ = await served(origin, None, ok(b"fresh"), fetch(pool))
    assert response.body == b"fresh"
    assert next_peer is not peer
    assert await peer.ended() == b""


def test_a_non_ascii_host_is_sent_in_its_idna_form() -> None:
    from aggregator.upstreams.http import _host_header

    assert _host_header("Bücher.Example:8080", "bücher.example", 8080) == (
        "xn--bcher-kva.example:8080"
    )
    assert _host_header("[::1]:8080", "::1", 8080) == "[::1]:8080"


async def test_connections_past_max_idle_are_closed_when_released(
    pools: Callable[..., Pool], origin: Origin
) -> None:
    pool = pools(max_idle=1)
    first, second = asyncio.create_task(fetch(pool)), asyncio.create_task(fetch(pool))
    early, late = await origin.accept(), await origin.accept()
    await early.request()
    await late.request()
    assert repr(pool) == state(origin, 2, 0)
    early.send(ok(b"early"))
    async with asyncio.timeout(WAIT):
        await asyncio.wait([first, second], return_when=asyncio.FIRST_COMPLETED)
    late.send(ok(b"late"))
    responses = {(await outcome(first)).body, (await outcome(second)).body}
    assert responses == {b"early", b"late"}
    assert await late.ended() == b""  # released second, past max_idle
    assert repr(pool) == state(origin, 1, 1)
    response, _, _ = await served(origin, early, ok(b"again"), fetch(pool))
    assert response.body == b"again"
    assert origin.connections == 2


@pytest.mark.parametrize("idempotent", [False, True])
async def test_aclose_closes_busy_and_idle_connections_and_refuses_later_requests(
    pool: Pool, origin: Origin, idempotent: bool
) -> None:
    _, busy, _ = await served(origin, None, ok(), fetch(pool))
    task = asyncio.create_task(fetch(pool, idempotent=idempotent))
    assert await busy.request() == GET  # and the server holds the answer
    _, idle, _ = await served(origin, None, ok(), fetch(pool))
    assert repr(pool) == state(origin, 2, 1)
    await pool.aclose()
    assert await busy.ended() == b""
    assert await idle.ended() == b""
    assert repr(pool) == state(origin, 0, 0)
    # Idempotent or not, the request fails as closed, and no new connection is made for it.
    with pytest.raises(Closed):
        await outcome(task)
    with pytest.raises(Closed):
        await fetch(pool)
    assert origin.connections == 2


# --- HttpUpstream over the pool ----------------------------------------------------------------


def call(
    upstream: HttpUpstream,
    method: str = "GET",
    path: str = "/items",
    query: tuple[tuple[str, str], ...] = (),
    headers: tuple[tuple[str, str], ...] = (),
    body: bytes | None = None,
) -> Coroutine[Any, Any, Reply]:
    return upstream.call(HttpRequest(method, path, query, headers, body), 2.0, "rid-1")


async def test_a_get_goes_out_as_exactly_these_bytes(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    upstream = upstreams()
    request = call(
        upstream,
        path="/items/1",
        query=(("q", "a b&c=d"), ("path", "/x?y"), ("page", "2")),
        headers=(("Accept", "application/json"), ("x-request-id", "caller's"), ("X-Trace", "t")),
    )
    reply, _, sent = await served(
        origin, None, ok(b"{}", "Content-Type: application/json"), request
    )
    assert sent == (
        b"GET /base/items/1?q=a+b%26c%3Dd&path=/x?y&page=2 HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{origin.port}\r\n".encode()
        + b"Accept: application/json\r\n"
        b"X-Trace: t\r\n"
        b"X-Request-Id: rid-1\r\n"
        b"\r\n"
    )
    assert reply == Reply(
        ok=True,
        body=b"{}",
        http_status=200,
        content_type="application/json",
    )  # no reason: a reply that is ok says none


async def test_an_upstream_declared_to_read_every_body_keeps_a_posts_connection(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    request = call(upstreams(reads_request_bodies=True), "POST", "/things", body=b"x")
    _, _, sent = await served(origin, None, ok(), request)
    assert b"Connection: close" not in sent
    assert sent.endswith(b"Content-Length: 1\r\n\r\nx")


@pytest.mark.parametrize(
    ("method", "headers", "body", "tail"),
    [
        (
            "POST",
            (),
            b"\x00\x01bytes",
            b"Content-Type: application/octet-stream\r\nConnection: close\r\n"
            b"Content-Length: 7\r\n\r\n\x00\x01bytes",
        ),
        (
            "POST",
            (("Content-Type", "application/json"),),
            b'{"a":1}',
            b'Connection: close\r\nContent-Length: 7\r\n\r\n{"a":1}',
        ),
        ("POST", (), None, b"Content-Length: 0\r\n\r\n"),
        ("PUT", (), None, b"Content-Length: 0\r\n\r\n"),
        ("PATCH", (), None, b"Content-Length: 0\r\n\r\n"),
        ("DELETE", (), None, b"\r\n"),
        (
            "DELETE",
            (),
            b"x",
            b"Content-Type: application/octet-stream\r\nConnection: close\r\n"
            b"Content-Length: 1\r\n\r\nx",
        ),
        (
            "PROPFIND",
            (),
            b"x",
            b"Content-Type: application/octet-stream\r\nConnection: close\r\n"
            b"Content-Length: 1\r\n\r\nx",
        ),
    ],
    ids=[
        "post-bytes",
        "post-typed",
        "post-empty",
        "put-empty",
        "patch-empty",
        "delete",
        "delete-body",
        "other-body",
    ],
)
async def test_a_body_or_its_absence_is_framed_by_content_length(
    upstreams: Callable[..., HttpUpstream],
    origin: Origin,
    method: str,
    headers: tuple[tuple[str, str], ...],
    body: bytes | None,
    tail: bytes,
) -> None:
    request = call(upstreams(), method, "/things", headers=headers, body=body)
    _, _, sent = await served(origin, None, ok(), request)
    typed = b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in headers)
    assert sent == (
        b"%s /base/things HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%sAccept: */*\r\n"
        b"X-Request-Id: rid-1\r\n%s" % (method.encode(), origin.port, typed, tail)
    )


async def test_a_path_outside_ascii_is_percent_encoded_and_escapes_kept(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    request = call(upstreams(), path="/café/naïve%2Fname/ü")
    _, _, sent = await served(origin, None, ok(), request)
    assert sent.split(b"\r\n")[0] == b"GET /base/caf%C3%A9/na%C3%AFve%2Fname/%C3%BC HTTP/1.1"


def raw_deflate(data: bytes) -> bytes:
    encoder = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return encoder.compress(data) + encoder.flush()


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        (" GZIP ", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", raw_deflate),
        ("identity", bytes),
    ],
    ids=["gzip", "x-gzip", "gzip-upper", "deflate", "raw-deflate", "identity"],
)
async def test_a_compressed_body_is_decoded(
    upstreams: Callable[..., HttpUpstream],
    origin: Origin,
    coding: str,
    encode: Callable[[bytes], bytes],
) -> None:
    body = b"hello, compressed world " * 40
    reply = ok(encode(body), f"Content-Encoding: {coding}", "Content-Type: text/plain")
    result, _, _ = await served(origin, None, reply, call(upstreams()))
    assert (result.ok, result.body, result.content_type) == (True, body, "text/plain")


async def test_a_coding_not_decoded_is_a_failure_naming_it(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    reply = ok(b"\x1b\x03\x00brotli", "Content-Encoding: br")
    with pytest.raises(TargetFailure) as caught:
        await served(origin, None, reply, call(upstreams()))
    assert (caught.value.outcome, caught.value.http_status) == (pb.OUTCOME_ERROR, 200)
    assert caught.value.sentence == (
        "up sent a body in content-coding 'br' (gzip and deflate are decoded)"
    )


async def test_a_broken_gzip_body_is_a_failure(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    reply = ok(b"not gzip at all", "Content-Encoding: gzip")
    with pytest.raises(TargetFailure) as caught:
        await served(origin, None, reply, call(upstreams()))
    assert caught.value.outcome == pb.OUTCOME_ERROR
    assert caught.value.sentence.startswith("up sent a broken gzip body: ")


@pytest.mark.parametrize(("size", "fits"), [(CAP, True), (CAP + 1, False), (200_000, False)])
async def test_a_body_decompressed_past_max_response_bytes_is_too_large(
    upstreams: Callable[..., HttpUpstream], origin: Origin, size: int, fits: bool
) -> None:
    compressed = gzip.compress(b"\0" * size)
    assert len(compressed) < CAP  # small on the wire: only decoding can pass the cap
    reply = ok(compressed, "Content-Encoding: gzip")
    request = call(upstreams(max_response_bytes=CAP))
    if fits:
        result, _, _ = await served(origin, None, reply, request)
        assert result.body == b"\0" * size
        return
    with pytest.raises(TargetFailure) as caught:
        await served(origin, None, reply, request)
    assert (caught.value.outcome, caught.value.http_status) == (pb.OUTCOME_ERROR, 200)
    assert caught.value.sentence == (
        f"response too large: up sent more than {CAP} bytes once decompressed "
        f"(upstreams.up.max_response_bytes is {CAP})"
    )


async def test_a_gzip_bomb_is_decoded_only_up_to_the_cap(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    cap = 40_000
    encoder = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = b"".join(encoder.compress(bytes(1 << 20)) for _ in range(32)) + encoder.flush()
    assert len(bomb) < cap  # 32 MiB of zeros in about 32 KB
    request = call(upstreams(max_response_bytes=cap))
    tracemalloc.start()
    try:
        with pytest.raises(TargetFailure, match=r"^response too large: up sent more than 40000"):
            await served(origin, None, ok(bomb, "Content-Encoding: gzip"), request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # a few caps' worth, never the 32 MiB the bomb holds


async def test_a_truncated_gzip_body_is_a_failure(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    reply = ok(gzip.compress(b"hello, compressed world " * 40)[:-12], "Content-Encoding: gzip")
    with pytest.raises(TargetFailure) as caught:
        await served(origin, None, reply, call(upstreams()))
    assert caught.value.sentence.startswith("up sent a broken gzip body")


async def test_every_member_of_a_gzip_body_is_decoded(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    reply = ok(gzip.compress(b"first, ") + gzip.compress(b"second"), "Content-Encoding: gzip")
    result, _, _ = await served(origin, None, reply, call(upstreams()))
    assert result.body == b"first, second"


@pytest.mark.parametrize(
    ("method", "headers", "retried"),
    [
        ("GET", (), True),
        ("POST", (), False),
        ("POST", (("Idempotency-Key", "k1"),), True),
    ],
    ids=["get", "post", "post-idempotency-key"],
)
async def test_a_stale_connection_is_tried_again_only_for_an_idempotent_request(
    upstreams: Callable[..., HttpUpstream],
    origin: Origin,
    method: str,
    headers: tuple[tuple[str, str], ...],
    retried: bool,
) -> None:
    upstream = upstreams()
    _, peer, _ = await served(origin, None, ok(), call(upstream))
    task = asyncio.create_task(call(upstream, method, headers=headers))
    await peer.request()
    peer.writer.close()
    if not retried:
        with pytest.raises(TargetFailure) as caught:
            await outcome(task)
        assert caught.value.outcome == pb.OUTCOME_UNAVAILABLE
        assert caught.value.sentence == "up closed the connection before answering"
        assert origin.connections == 1
        return
    fresh = await origin.accept()
    await fresh.request()
    fresh.send(ok(b"second try"))
    assert (await outcome(task)).body == b"second try"


async def test_a_refused_connection_is_unavailable(
    upstreams: Callable[..., HttpUpstream],
) -> None:
    upstream = upstreams(url=f"http://127.0.0.1:{refused_port()}")
    with pytest.raises(TargetFailure) as caught:
        await call(upstream)
    assert caught.value.outcome == pb.OUTCOME_UNAVAILABLE
    assert caught.value.sentence.startswith("could not connect to up: ")


async def test_a_connect_timeout_is_unavailable(upstreams: Callable[..., HttpUpstream]) -> None:
    with unanswered_port() as port:
        upstream = upstreams(url=f"http://127.0.0.1:{port}", connect_timeout=0.1)
        with pytest.raises(TargetFailure) as caught:
            await call(upstream)
    assert caught.value.outcome == pb.OUTCOME_UNAVAILABLE
    assert caught.value.sentence == "could not connect to up within connect_timeout 100ms"


async def test_aclose_closes_every_connection_and_later_calls_fail_cleanly(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    upstream = upstreams()
    calls = [asyncio.create_task(call(upstream)) for _ in range(2)]
    peers = [await origin.accept() for _ in calls]
    for peer in peers:
        await peer.request()
        peer.send(ok())
    for task in calls:
        assert (await outcome(task)).ok
    cached = "[1 paths cached, 17 chars]"  # "/items", "/base/items"
    pool_state = state(origin, 2, 2)
    assert (
        repr(upstream)
        == f"<HttpUpstream up http://127.0.0.1:{origin.port}/base {cached} {pool_state}>"
    )
    await upstream.aclose()
    for peer in peers:
        assert await peer.ended() == b""
    with pytest.raises(TargetFailure) as caught:
        await call(upstream)
    assert caught.value.outcome == pb.OUTCOME_CANCELLED  # neither retried nor a breaker failure
    assert caught.value.sentence == "the connections to up were closed: the server is stopping"
    assert origin.connections == 2


# --- closing mid-answer, memory held, endless trailers, escapes, padding, name lookups -------


async def until(condition: Callable[[], bool], turns: int = 100_000) -> None:
    """Lets the loop turn until ``condition`` holds (bounded): for a state of the client that no
    event announces, such as "the head has been parsed"."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"still not so after {turns} turns of the loop")


def head_parsed(pool: Pool) -> bool:
    return any(connection._headers_done for connection in pool._open)


# --- a connection's state when it is handed on or closed ------------------------------------------


async def test_aclose_during_a_close_delimited_body_is_not_a_whole_answer(
    pool: Pool, origin: Origin
) -> None:
    task, peer = await held(pool, origin)
    peer.send(head("200 OK", "Content-Type: text/plain") + b"the first half, ")
    await until(lambda: head_parsed(pool))
    await pool.aclose()
    with pytest.raises(Closed):
        await outcome(task)
    assert repr(pool).endswith("[0 open, 0 idle]>")  # aclose returned: the sockets are gone


async def test_an_idle_connection_keeps_nothing_of_its_last_answer(
    pool: Pool, origin: Origin
) -> None:
    size = 4 << 20
    reply = head("200 OK", "Transfer-Encoding: chunked") + b"".join(
        chunk(bytes(64 << 10)) for _ in range(size // (64 << 10))
    )
    reply += b"0\r\n\r\n"
    gc.collect()
    tracemalloc.start()
    try:
        response, _, _ = await served(origin, None, reply, fetch(pool, cap=2 * size))
        assert len(response.body) == size
        assert repr(pool).endswith("[1 open, 1 idle]>")
        del response
        # A step later: the handle that woke this task (holding the answer) has run.
        await asyncio.sleep(0)
        gc.collect()
        idle, _ = tracemalloc.get_traced_memory()
        await pool.aclose()
        await until(lambda: not pool._open)
        gc.collect()
        closed, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held = idle - closed
    assert held < size // 4, f"the idle connection held {held} bytes"


# --- what a hostile upstream can make us hold --------------------------------------------------


async def test_a_body_in_one_byte_chunks_costs_no_more_memory_than_its_bytes(
    pool: Pool, origin: Origin
) -> None:
    size = 1 << 20
    reply = head("200 OK", "Transfer-Encoding: chunked") + chunk(b"x") * size + b"0\r\n\r\n"
    gc.collect()
    tracemalloc.start()
    try:
        response, _, _ = await served(origin, None, reply, fetch(pool, cap=size))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.body == b"x" * size
    # The reply as sent and read (7 MiB) and the body (twice, as read and as handed over); a
    # piece of bytes a chunk took 41 MiB more.
    assert peak < 7 * size + 4 * size, peak


async def test_an_endless_trailer_is_refused_before_it_ends(pool: Pool, origin: Origin) -> None:
    task, peer = await held(pool, origin)
    peer.send(head("200 OK", "Transfer-Encoding: chunked") + chunk(b"hi") + b"0\r\nX-Big: ")
    peer.send(b"v" * (1 << 20))  # 16 times _MAX_HEAD, never ended...
    await peer.writer.drain()
    peer.writer.write_eof()  # ...so that the test ends either way
    with pytest.raises(BrokenResponse):
        await outcome(task)


# --- semantics the aiohttp client had ----------------------------------------------------------


async def test_a_percent_sign_that_begins_no_escape_is_escaped(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    _, _, sent = await served(origin, None, ok(), call(upstreams(), path="/sale/50%off"))
    assert sent.split(b"\r\n")[0] == b"GET /base/sale/50%25off HTTP/1.1"


async def test_a_gzip_body_padded_with_zeros_is_decoded(
    upstreams: Callable[..., HttpUpstream], origin: Origin
) -> None:
    body = gzip.compress(b"padded") + bytes(8)
    assert gzip.decompress(body) == b"padded"
    reply = ok(body, "Content-Encoding: gzip")
    result, _, _ = await served(origin, None, reply, call(upstreams()))
    assert result.body == b"padded"


# --- what connect_timeout measures ---------------------------------------------------------------


async def test_a_slow_name_lookup_is_not_counted_as_the_connect(
    upstreams: Callable[..., HttpUpstream], origin: Origin, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()

    async def slow_lookup(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        await asyncio.sleep(0.2)  # a DNS server that takes 200 ms (ndots:5 search lists do)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]

    monkeypatch.setattr(loop, "getaddrinfo", slow_lookup)
    upstream = upstreams(url=f"http://upstream.test:{origin.port}", connect_timeout=0.1)
    server = asyncio.create_task(respond(origin, None, ok()))
    try:
        assert (await outcome(asyncio.create_task(call(upstream)))).ok
    finally:
        server.cancel()
        await asyncio.wait([server])
