"""HTTP/1.1 to one origin: keep-alive connections on asyncio Protocols, parsed by llhttp.

The REST upstreams' transport. aiohttp's client did the same work for about 190 µs more Python
per request than this module (measured on this project's machine: 222 against 30 µs of CPU
for a keep-alive GET on uvloop; see docs/performance.md): at five targets an
aggregate that was 40% of the server's CPU. What it keeps of a full client is what an
aggregator needs: keep-alive pooling with an idle limit, TLS, framing by Content-Length,
chunked or close, 1xx responses skipped, a cap on what a response may make us buffer, and a
second try on a fresh connection when a kept-alive one turns out closed under an idempotent
request. What it leaves out on purpose: redirects (never followed here), cookies (never kept),
proxies, pipelining, HTTP/2.

The parser is httptools (llhttp, the parser of Node.js and of aiohttp itself). A response is
handed over whole; bodies are bounded by ``max_response_bytes``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import select
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

import aiohappyeyeballs
import httptools

from aggregator.timers import SYSTEM_CLOCK, Cancellable, Clock
from aggregator.upstreams.http1_answers import (
    BrokenResponse,
    Closed,
    ConnectTimeout,
    Disconnected,
    Response,
    TooLarge,
)

# A header line longer than this, or a head larger than _MAX_HEAD, is a broken response (the
# limits of aiohttp's client and of most servers: nothing legitimate comes near them).
_MAX_HEADER_LINE = 8190
_MAX_HEAD = 64 * 1024
_KEEPALIVE = 30.0  # an idle connection is reused for at most this long (aiohttp's was 30 s too)
_DNS_TTL = 60.0  # a host name's addresses are kept this long (aiohttp's ttl_dns_cache here)
_HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305's default: the next address is tried after this long
_MAX_INFORMATIONAL = 8  # 1xx responses before the answer; more is an upstream stuck in a loop
_TLS_SHUTDOWN = 2.0  # a closed TLS connection waits at most this long for the peer's close_notify
# Response headers the upstream layer reads; the others are parsed by llhttp and dropped.
WANTED_HEADERS = frozenset(
    {
        b"content-type",
        b"cache-control",
        b"retry-after",
        b"content-encoding",
        b"content-length",
        b"keep-alive",  # its timeout=N: the upstream closes idle connections sooner than we would
    }
)
AddressInfo = tuple[int, int, int, str, tuple[Any, ...]]


class Pool:
    """Keep-alive connections to one host and port, most recently used first.

    Connections open on demand: how many run at once is the upstream's bulkhead's business
    (``max_concurrency``), and at most ``max_idle`` wait for reuse.
    """

    def __init__(
        self,
        host: str,
        port: int,
        connect_timeout: float,
        max_idle: int,
        ssl_context: Callable[[], ssl.SSLContext] | None = None,
        keepalive: float = _KEEPALIVE,
        connect_to: str = "",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        # ``host`` names the origin (TLS's server name); ``connect_to``, when given, is the IP
        # address of the one endpoint of it this pool connects to (docs/fleet.md).
        self._host = host
        self._port = port
        self._clock = clock  # keep-alive expiry and the DNS cache run on it
        literal = _literal_info(connect_to or host, port)
        self._addresses: list[AddressInfo] = [literal] if literal is not None else []
        self._resolved_until = float("inf") if literal is not None else 0.0
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._ssl_context = ssl_context
        self._keepalive = keepalive
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._sweep: Cancellable | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<Pool {self._host}:{self._port} [{len(self._open)} open, {len(self._idle)} idle]>"

    def connections(self) -> tuple[int, int]:
        """Connections open now: (idle, busy), for aggregator_upstream_connections."""
        idle = len(self._idle)
        return idle, len(self._open) - idle

    async def request(
        self, data: bytes, *, head_only: bool, cap: int, idempotent: bool, last: bool = False
    ) -> Response:
        """Sends ``data`` (a whole request) and returns the whole response.

        ``last``: the request says ``Connection: close`` and its connection is closed after
        the answer, never reused (a body the upstream may not read must not become the start
        of the next request). Raises ConnectTimeout, OSError (ssl.SSLError and
        socket.gaierror included) from connecting, Disconnected, BrokenResponse, TooLarge or
        Closed. A cancelled request closes its connection.
        """
        connection = self._take()
        if connection is None:
            connection = await self._connect()
            return await connection.exchange(data, head_only, cap, last)
        try:
            return await connection.exchange(data, head_only, cap, last)
        except Disconnected as exc:
            # The upstream closed a kept-alive connection as we reused it (it had not read
            # the request, or would have answered something): once more on a fresh one.
            if exc.answered or not idempotent:
                raise
        connection = await self._connect()
        return await connection.exchange(data, head_only, cap, last)

    def _take(self) -> _Connection | None:
        idle = self._idle
        # After a certificate rotation, connections made with the old context are not reused.
        context = self._ssl_context() if self._ssl_context is not None else None
        now = self._clock.monotonic()
        while idle:
            connection = idle.pop()
            if (
                connection.usable()
                and connection.context is context
                and connection.expires > now
                and connection.quiet()
            ):
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        """A new connection. Only the TCP (and TLS) connect is held to the connect timeout: a
        name is looked up before it, and its addresses are kept for _DNS_TTL."""
        if self._closed:
            raise Closed()
        addresses = await self._resolved()
        context = self._ssl_context() if self._ssl_context is not None else None
        try:
            async with asyncio.timeout(self._connect_timeout):
                connection = await self._connect_to(addresses, context)
        except TimeoutError as exc:
            raise ConnectTimeout() from exc
        if self._closed:  # closed while connecting: aclose did not see this one
            connection.shut()
            raise Closed()
        if connection.usable():  # the peer may have closed it before we got here
            self._open.add(connection)
        return connection

    async def _connect_to(
        self, addresses: list[AddressInfo], context: ssl.SSLContext | None
    ) -> _Connection:
        """A connection to one of ``addresses``: tried in order, the next one started when the
        one before has not answered within 250 ms (Happy Eyeballs, RFC 8305, as aiohttp)."""
        loop = asyncio.get_running_loop()
        sock = await aiohappyeyeballs.start_connection(
            addresses, happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY, interleave=1
        )
        made: list[_Connection] = []

        def protocol() -> _Connection:
            made.append(_Connection(self, context))
            return made[-1]

        try:
            _, connection = await loop.create_connection(
                protocol,
                sock=sock,
                ssl=context,
                server_hostname=self._host if context is not None else None,
                ssl_shutdown_timeout=_TLS_SHUTDOWN if context is not None else None,
            )
        except BaseException:
            sock.close()  # create_connection owns it only once it succeeds
            # Cancelled after connection_made but before this task resumed, uvloop closes the
            # transport without ever calling connection_lost (and a TLS one closes gracefully,
            # waiting for the peer): the connection is aborted here, and was never the pool's.
            for connection in made:
                connection.abort()
            raise
        return connection

    async def _resolved(self) -> list[AddressInfo]:
        if self._clock.monotonic() < self._resolved_until:  # an IP literal: for ever
            return self._addresses
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        self._addresses = [(int(f), int(t), p, c, a) for f, t, p, c, a in infos]
        self._resolved_until = self._clock.monotonic() + _DNS_TTL
        return self._addresses

    def lost(self, connection: _Connection) -> None:
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    def release(self, connection: _Connection, upstream_keepalive: float | None) -> None:
        """Takes back a connection whose last response ended cleanly and may be reused, for as
        long as we keep idle connections or, if less, a second less than the upstream said."""
        keep = self._keepalive
        if upstream_keepalive is not None:
            keep = min(keep, upstream_keepalive - 1.0)
        if self._closed or len(self._idle) >= self._max_idle or keep <= 0:
            connection.close()
            return
        connection.expires = self._clock.monotonic() + keep
        self._idle.append(connection)
        if self._sweep is None:
            self._arm_sweep()

    def _arm_sweep(self) -> None:
        self._sweep = self._clock.call_later(self._keepalive / 2, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Closes the idle connections past their time (a request never takes one: _take)."""
        self._sweep = None
        now = self._clock.monotonic()
        for connection in [c for c in self._idle if c.expires <= now]:
            self._idle.remove(connection)
            connection.close()
        if self._idle:
            self._arm_sweep()

    async def aclose(self) -> None:
        """Fails requests still running (Closed), closes every connection and waits until
        they are gone."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._idle.clear()
        connections = list(self._open)
        for connection in connections:
            connection.shut()
        if connections:  # aborted transports report their end at once; bounded all the same
            await asyncio.wait([connection.lost for connection in connections], timeout=2.0)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; one exchange at a time, responses handed over whole."""

    def __init__(self, pool: Pool, context: ssl.SSLContext | None = None) -> None:
        self._pool = pool
        self.context = context  # what it was made with: after a rotation it is not reused
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        # A body may come in a million one-byte chunks: llhttp's callbacks for each are C
        # methods, no Python frame (0.2 s of CPU per MB with methods of ours, 41 bytes of
        # memory per byte of body as a list of pieces). Set before the parser, which takes them
        # once. The cap is checked after each read and at the end of the message.
        self._body = bytearray()
        self.on_body = self._body.extend
        self._chunk_counter = itertools.count()
        self.on_chunk_header = self._chunk_counter.__next__
        self._counter_offset = 0
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._poll: select.poll | None = None  # the socket, asked before it is reused
        self._last = False  # the request asked to close: never reused
        self._informational = 0
        self._waiter: asyncio.Future[Response] | None = None
        self._served = 0
        self.expires = 0.0  # while idle: when it may no longer be taken
        self._reset(False, 0)

    def __repr__(self) -> str:
        state = "busy" if self._waiter is not None else "idle"
        return f"<_Connection {state} [{self._served} served]>"

    def _reset(self, head_only: bool, cap: int) -> None:
        self._head_only = head_only
        self._cap = cap
        self._status = 0
        self._reason = b""
        self._headers: dict[bytes, bytes] = {}
        self._head_size = 0  # header bytes parsed, for _MAX_HEAD
        self._read = 0  # bytes of this response read so far: what is not body is framing
        self._counter_offset = next(self._chunk_counter) + 1
        del self._body[:]
        self._received = False
        self._headers_done = False
        self._framed = False  # Content-Length or chunked: the end is not the connection's end
        self._failure: Exception | None = None

    # The exchange, as the pool's caller sees it.

    async def exchange(self, data: bytes, head_only: bool, cap: int, last: bool) -> Response:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise Disconnected(False, None)
        self._reset(head_only, cap)
        self._last = last
        self._informational = 0
        waiter: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        # No wait for the write buffer to drain: a request is bounded by max_request_bytes.
        transport.write(data)
        try:
            return await waiter
        except BaseException:
            # Cancelled (or failed) while the exchange is still ours: what is left on the
            # connection is not the next request's answer. Once the answer is in, the
            # connection may already serve another request: then it is not ours to close.
            if self._waiter is waiter:
                self.abort()
            raise

    def usable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def quiet(self) -> bool:
        """Nothing waits to be read: no byte the loop has not delivered yet, no end. Bytes after
        an answer are no answer to the next request; asked just before that request is written,
        for bytes that arrived in the same turn of the loop (earlier ones were seen idle)."""
        if self._poll is None:
            return True
        try:
            return not self._poll.poll(0)
        except OSError:
            return False

    def shut(self) -> None:
        """Fails the request running on this connection, if any, and closes it at once."""
        self._fail(Closed())

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._waiter = None
        if self._transport is not None:
            self._transport.abort()

    def _finish(self, reusable: bool) -> None:
        """Hands the answer over; the connection goes back to the pool only if the exchange is
        complete on both sides: the response framed and kept alive (``reusable``), the request
        not the last and written whole (an upstream that answers before reading all of a body
        leaves the rest to be read as the next request)."""
        waiter, self._waiter = self._waiter, None
        transport = self._transport
        reusable = (
            reusable
            and not self._last
            and transport is not None
            and transport.get_write_buffer_size() == 0
        )
        self._served += 1
        if waiter is not None and not waiter.done():
            body = bytes(self._body)
            reason = self._reason.decode("latin-1")
            waiter.set_result(Response(self._status, reason, self._headers, body))
        del self._body[:]  # an idle connection holds nothing of its last answer
        if reusable:
            self._pool.release(self, _keepalive_timeout(self._headers.get(b"keep-alive")))
        elif transport is not None and transport.get_write_buffer_size():
            transport.abort()  # a close would wait to write the rest, to a peer that may not read
        else:
            self.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        del self._body[:]
        if self._transport is not None:
            self._transport.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not the pool's yet: it registers the connection once create_connection has returned
        # to the task that made it (Pool._connect), never one whose connect was cancelled.
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio and uvloop both set it today; a request is one write, never worth a delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            self._fail(BrokenResponse("data arrived with no request outstanding"))
            return
        self._received = True
        self._read += len(data)
        assert self._parser is not None  # until connection_lost
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # 101 Switching Protocols: its head is the answer (on_headers_complete)
        except httptools.HttpParserError as exc:  # a callback's own failure comes first
            self._failure = self._failure or BrokenResponse(str(exc) or type(exc).__name__)
        if self._failure is None and self._waiter is not None:  # not answered in this read
            self._failure = self._overrun()
        if self._failure is not None:
            self._fail(self._failure)

    def _overrun(self) -> Exception | None:
        """What is wrong with the size of the response so far, if anything."""
        size = len(self._body)
        if size > self._cap:
            return TooLarge(self._status, f"sent more than {self._cap} bytes")
        framing = self._read - size
        if framing > _MAX_HEAD and framing > self._framing_allowed():
            # llhttp reports a header or trailer only once its line ends: an endless line
            # would be buffered until then, so what is not body is counted here
            return BrokenResponse("a response head or trailer is too long")
        return None

    def _framing_allowed(self) -> int:
        """Bytes of a response that are not body: its head, chunk sizes, trailers."""
        if not self._headers_done:
            return _MAX_HEAD
        return 2 * _MAX_HEAD + 64 * self._chunks_parsed()

    def _chunks_parsed(self) -> int:
        """Chunk heads of this response parsed so far (the counter counts its reads too)."""
        chunks = next(self._chunk_counter) - self._counter_offset
        self._counter_offset += 1
        return chunks

    def eof_received(self) -> bool:
        return False  # close: a response is never followed by a half-closed conversation

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._parser = None  # it and this protocol refer to each other: freed without the GC
        self._pool.lost(self)
        if not self.lost.done():
            self.lost.set_result(None)
        if self._waiter is None:
            return
        if self._headers_done and not self._framed and exc is None:
            self._finish(False)  # a body ended by the connection's end (no length, not chunked)
        else:
            self._fail(Disconnected(self._received, exc))

    # httptools callbacks (an exception here is kept in _failure and raised by data_received)

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # More after the answer, in the same read: never the next request's answer.
            self._failure = BrokenResponse("data arrived with no request outstanding")
            raise self._failure

    def on_status(self, status: bytes) -> None:
        self._reason += status
        if len(self._reason) > _MAX_HEADER_LINE:
            self._failure = BrokenResponse("a response's status line is too long")
            raise self._failure

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a chunked body's trailers: not headers of this response
        self._head_size += len(name) + len(value) + 4
        if len(name) + len(value) + 2 > _MAX_HEADER_LINE or self._head_size > _MAX_HEAD:
            self._failure = BrokenResponse("a response header is too long")
            raise self._failure
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self._framed = True
        if name in WANTED_HEADERS:
            seen = self._headers.get(name)
            self._headers[name] = value if seen is None else seen + b", " + value

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # informational: the answer follows
        self._status = status
        self._headers_done = True
        if status == 101 or self._head_only:
            self._finish(False)  # no body follows that is ours to read
            return
        if status in (204, 304):
            return  # never a body, whatever length the representation has
        declared = self._headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._cap:
            self._failure = TooLarge(status, f"announced {int(declared)} bytes")
            raise self._failure

    def on_message_complete(self) -> None:
        if not self._headers_done:  # the end of a 1xx response: start over for the answer
            self._informational += 1
            if self._informational > _MAX_INFORMATIONAL:
                self._failure = BrokenResponse("too many informational (1xx) responses")
                raise self._failure
            self._reset(self._head_only, self._cap)
            self._received = True
            return
        if len(self._body) > self._cap:  # all in one read: data_received has not seen it
            self._failure = TooLarge(self._status, f"sent more than {self._cap} bytes")
            raise self._failure
        if self._waiter is not None:
            assert self._parser is not None
            self._finish(self._parser.should_keep_alive())


def _literal_info(host: str, port: int) -> AddressInfo | None:
    """The address of an IP literal, which needs no lookup; None for a name."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    if version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))


def _keepalive_timeout(value: bytes | None) -> float | None:
    """``timeout=N`` of a Keep-Alive header (RFC 2068 §19.7.1), if any and well formed."""
    if value is None:
        return None
    for part in value.split(b","):
        name, _, number = part.strip().partition(b"=")
        if name.strip().lower() == b"timeout" and number.strip().isdigit():
            return float(number.strip())
    return None
