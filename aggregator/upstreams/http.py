"""REST upstreams: one keep-alive HTTP/1.1 pool per upstream (http1.py), alive as long as the
server; requests are written and responses read as whole messages."""

from __future__ import annotations

import email.utils
import re
import ssl
import zlib
from collections.abc import MutableSet
from datetime import UTC, datetime
from urllib.parse import quote, quote_plus, urlsplit

from aggregator.config import UpstreamConfig
from aggregator.errors import TargetFailure
from aggregator.metrics import Pooled
from aggregator.request import GrpcRequest, HttpRequest
from aggregator.security.files import Watched
from aggregator.security.tls import ssl_context, upstream_files
from aggregator.timers import SYSTEM_CLOCK, Clock
from aggregator.upstreams.http1 import Pool
from aggregator.upstreams.http1_answers import (
    BrokenResponse,
    Closed,
    ConnectTimeout,
    Disconnected,
    Response,
    TooLarge,
)
from aggregator.upstreams.seam import Reply
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import NO_BODY_METHODS

# RFC 3986's pchar and "/", plus "%" so that what the caller (or substitution) escaped stays so.
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_QUERY_SAFE = "?/:@"  # as yarl, which aiohttp used: space as "+", the rest escaped
_BARE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a "%" that begins no escape: "%25"
_GZIP_MAGIC = b"\x1f\x8b"
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})  # methods that send Content-Length: 0 empty
# Each gzip member costs a decoder of its own (some 40 KiB and microseconds to make): a body of
# thousands of empty members is work for nothing. Concatenated gzip files have a few.
MAX_GZIP_MEMBERS = 64
_DECODE_SLICE = 64 * 1024  # fed to a decoder at a time: what it copies as unused_data is no more
# Paths come from callers: only short ones are kept escaped, within a total size in characters.
_CACHED_PATH = 256
_TARGETS_SIZE = 256 * 1024
_TARGETS = 4096  # and at most this many entries
_DECODERS = {
    b"gzip": 16 + zlib.MAX_WBITS,
    b"x-gzip": 16 + zlib.MAX_WBITS,
    b"deflate": zlib.MAX_WBITS,  # with the zlib header RFC 9110 asks for; raw deflate below
}


class HttpUpstream:
    """Calls one configured base URL; the only host it ever contacts is that URL's host."""

    def __init__(
        self,
        config: UpstreamConfig,
        url: str = "",
        connect_to: str = "",
        clock: Clock = SYSTEM_CLOCK,
        pools: MutableSet[Pooled] | None = None,
    ) -> None:
        """``url``: one entry of the upstream's ``url`` (its first by default); ``connect_to``:
        the one address of it that this instance connects to (an endpoint of a fleet);
        ``pools``: where its pool is counted (aggregator_upstream_connections)."""
        self.name = config.name
        self._reads_bodies = config.reads_request_bodies
        self._base = url or config.url
        parts = urlsplit(self._base)
        secure = parts.scheme == "https"
        self._host_line = (
            f"Host: {_host_header(parts.netloc, parts.hostname or '', parts.port)}\r\n"
        )
        self._base_path = parts.path
        self._connect_timeout = config.connect_timeout
        self._max_response_bytes = config.max_response_bytes
        self._targets: dict[str, str] = {}
        self._targets_size = 0  # characters of the paths and targets in _targets
        tls = config.tls
        # Re-read when the files change; each new connection takes the current context.
        self._tls = (
            Watched(f"upstreams.{config.name}.tls", upstream_files(tls), lambda: ssl_context(tls))
            if tls is not None
            else None
        )
        self._default_tls = ssl.create_default_context() if secure and tls is None else None
        self._pool = Pool(
            parts.hostname or "",
            parts.port or (443 if secure else 80),
            config.connect_timeout,
            max_idle=config.max_concurrency,
            ssl_context=self._ssl_context if secure else None,
            connect_to=connect_to,
            clock=clock,
        )
        if pools is not None:
            pools.add(self._pool)

    def __repr__(self) -> str:
        cached = f"[{len(self._targets)} paths cached, {self._targets_size} chars]"
        return f"<HttpUpstream {self.name} {self._base} {cached} {self._pool!r}>"

    def _ssl_context(self) -> ssl.SSLContext:
        if self._tls is not None:
            return self._tls.current()
        assert self._default_tls is not None
        return self._default_tls

    async def call(
        self, request: HttpRequest | GrpcRequest, timeout: float, request_id: str
    ) -> Reply:
        assert isinstance(request, HttpRequest)
        method = request.method
        data, last = self._encode(request, request_id)
        try:
            response = await self._pool.request(
                data,
                head_only=method == "HEAD",
                cap=self._max_response_bytes,
                idempotent=request.idempotent,
                last=last,
            )
        except (OSError, ConnectTimeout, Disconnected, BrokenResponse, Closed) as exc:
            # Transport failures become outcomes; CancelledError is none of these.
            raise _target_failure(exc, self.name, self._connect_timeout) from exc
        except TooLarge as exc:
            raise self._too_large(exc.status, exc.what) from exc
        return self._reply(response)

    def _encode(self, request: HttpRequest, request_id: str) -> tuple[bytes, bool]:
        """The whole request as it goes on the wire, head and body, and whether it must be the
        last on its connection. A server may answer without reading a body (a 401 before the
        upload), and then read the body as the next request on the connection (request
        smuggling): so a request with a body goes with ``Connection: close`` and its connection
        is never reused, unless the upstream is declared to read every body
        (``reads_request_bodies``, for POST, PUT and PATCH); a body on GET, HEAD, OPTIONS,
        TRACE or CONNECT is refused (docs/security.md)."""
        body = request.body
        if body is not None and request.method in NO_BODY_METHODS:
            raise TargetFailure(
                pb.OUTCOME_ERROR,
                f"refused: a {request.method} request to {self.name} never carries a body "
                "(an upstream that does not read it would take it for another request)",
            )
        target = self._target(request.path)
        if request.query:
            target += "?" + "&".join(
                f"{quote_plus(name, _QUERY_SAFE)}={quote_plus(value, _QUERY_SAFE)}"
                for name, value in request.query
            )
        lines = [f"{request.method} {target} HTTP/1.1\r\n", self._host_line]
        typed = accepts = False
        for name, value in request.headers:
            folded = name.lower()
            if folded == "x-request-id":
                continue  # ours, below: the one id that every log line carries
            typed = typed or folded == "content-type"
            accepts = accepts or folded == "accept"
            lines.append(f"{name}: {value}\r\n")
        if not accepts:
            lines.append("Accept: */*\r\n")  # as curl and aiohttp: some servers want one
        lines.append(f"X-Request-Id: {request_id}\r\n")
        if body is not None:
            if not typed:
                lines.append("Content-Type: application/octet-stream\r\n")
            last = not (self._reads_bodies and request.method in _WITH_BODY)
            if last:
                lines.append("Connection: close\r\n")
            lines.append(f"Content-Length: {len(body)}\r\n\r\n")
            return "".join(lines).encode() + body, last
        if request.method in _WITH_BODY:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        return "".join(lines).encode(), False

    def _target(self, path: str) -> str:
        """The request target of ``path`` on this upstream, escaped once per distinct short path
        (the cache holds at most _TARGETS_SIZE characters, whatever callers send)."""
        target = self._targets.get(path)
        if target is None:
            target = self._base_path + _BARE_PERCENT.sub("%25", quote(path, _PATH_SAFE))
            if len(path) <= _CACHED_PATH:
                size = len(path) + len(target)
                full = len(self._targets) >= _TARGETS
                if full or self._targets_size + size > _TARGETS_SIZE:
                    self._targets.clear()
                    self._targets_size = 0
                self._targets[path] = target
                self._targets_size += size
        return target

    def _reply(self, response: Response) -> Reply:
        status = response.status
        headers = response.headers
        body = response.body
        encoding = headers.get(b"content-encoding")
        if encoding is not None and body:
            body = self._decoded(body, encoding.strip().lower(), status)
        ok = 200 <= status < 300
        return Reply(
            ok=ok,
            body=body,
            http_status=status,
            content_type=headers.get(b"content-type", b"").decode("latin-1"),
            cache_control=headers.get(b"cache-control", b"").decode("latin-1"),
            reason="" if ok else _reason(status, response.reason),  # said of failures only
            retry_after=_retry_after(headers.get(b"retry-after", b"").decode("latin-1"))
            if status >= 400
            else None,
        )

    def _decoded(self, body: bytes, encoding: bytes, status: int) -> bytes:
        """A gzip or deflate body decompressed (the caller gets the body, never its coding),
        within max_response_bytes."""
        if encoding == b"identity":
            return body
        wbits = _DECODERS.get(encoding)
        if wbits is None:
            raise TargetFailure(
                pb.OUTCOME_ERROR,
                f"{self.name} sent a body in content-coding {encoding.decode('latin-1')!r} "
                "(gzip and deflate are decoded)",
                http_status=status,
            )
        cap = self._max_response_bytes
        if encoding == b"deflate" and body[:1] != b"\x78":  # raw deflate, no zlib header
            wbits = -zlib.MAX_WBITS
        try:
            decoded = _decompress(body, wbits, cap + 1)
        except TooManyMembers as exc:
            raise TargetFailure(
                pb.OUTCOME_ERROR,
                f"{self.name} sent a gzip body of more than {MAX_GZIP_MEMBERS} members "
                "(concatenated gzip streams)",
                http_status=status,
                protocol_error=True,
            ) from exc
        except zlib.error as exc:
            raise TargetFailure(
                pb.OUTCOME_ERROR,
                f"{self.name} sent a broken {encoding.decode()} body: {exc}",
                http_status=status,
                protocol_error=True,
            ) from exc
        if len(decoded) > cap:
            raise self._too_large(status, f"sent more than {cap} bytes once decompressed")
        return decoded

    def _too_large(self, status: int, what: str) -> TargetFailure:
        return TargetFailure(
            pb.OUTCOME_ERROR,
            f"response too large: {self.name} {what} "
            f"(upstreams.{self.name}.max_response_bytes is {self._max_response_bytes})",
            http_status=status,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class TooManyMembers(Exception):
    """A gzip body of more than MAX_GZIP_MEMBERS members."""


def _decompress(body: bytes, wbits: int, limit: int) -> bytes:
    """At most ``limit`` bytes of ``body`` decoded: every member of a gzip body (RFC 1952 allows
    several, up to MAX_GZIP_MEMBERS here; zero padding after the last is ignored, as gzip does);
    raises zlib.error for a stream that is broken or cut short, TooManyMembers. Linear in the
    body: read through a memoryview at an offset, never copied per member."""
    view = memoryview(body)
    parts: list[bytes] = []
    size = offset = members = 0
    while size < limit:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise TooManyMembers()
        decoder = zlib.decompressobj(wbits)
        while not decoder.eof and offset < len(view) and size < limit:
            piece = view[offset : offset + _DECODE_SLICE]
            part = decoder.decompress(piece, limit - size)
            parts.append(part)
            size += len(part)
            offset += len(piece) - len(decoder.unused_data) - len(decoder.unconsumed_tail)
        if size >= limit:
            break
        if not decoder.eof:
            raise zlib.error("the stream ends before its end")
        offset = _after_zeros(body, offset)
        if wbits != _DECODERS[b"gzip"] or not body.startswith(_GZIP_MAGIC, offset):
            break  # one deflate stream; or after the last gzip member, nothing of ours
    return b"".join(parts)


def _after_zeros(body: bytes, offset: int) -> int:
    """Where the zero bytes from ``offset`` end (gzip pads with zeros), in slices, never
    copying the rest of the body."""
    while offset < len(body):
        end = offset + _DECODE_SLICE
        rest = body[offset:end].lstrip(b"\x00")
        if rest:
            return min(end, len(body)) - len(rest)
        offset = end
    return len(body)


def _host_header(netloc: str, hostname: str, port: int | None) -> str:
    """The Host header of a base URL: as written, or a non-ASCII name in its IDNA form."""
    if netloc.isascii():
        return netloc
    host = hostname.encode("idna").decode("ascii")
    return host if port is None else f"{host}:{port}"


def _reason(status: int, phrase: str) -> str:
    reason = f"HTTP {status} {phrase or ''}".rstrip()
    if 300 <= status < 400:
        return f"{reason} (redirects are not followed)"
    return reason


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _target_failure(exc: Exception, name: str, connect_timeout: float) -> TargetFailure:
    """The outcome a transport error stands for, in one sentence (most specific first: the
    certificate error is an SSL error, and every SSL error an OSError)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TargetFailure(
            pb.OUTCOME_UNAVAILABLE, f"could not verify {name}'s TLS certificate: {_ssl_reason(exc)}"
        )
    if isinstance(exc, ssl.SSLError):
        return TargetFailure(
            pb.OUTCOME_UNAVAILABLE, f"TLS handshake with {name} failed: {_ssl_reason(exc)}"
        )
    if isinstance(exc, ConnectTimeout):
        return TargetFailure(
            pb.OUTCOME_UNAVAILABLE,
            f"could not connect to {name} within connect_timeout {connect_timeout * 1000:g}ms",
        )
    if isinstance(exc, Disconnected):
        if exc.answered:
            return TargetFailure(
                pb.OUTCOME_UNAVAILABLE, f"{name} broke off the response body{_cause(exc.cause)}"
            )
        return TargetFailure(
            pb.OUTCOME_UNAVAILABLE,
            f"{name} closed the connection before answering{_cause(exc.cause)}",
        )
    if isinstance(exc, Closed):  # neither retried nor held against the upstream's breaker
        return TargetFailure(
            pb.OUTCOME_CANCELLED, f"the connections to {name} were closed: the server is stopping"
        )
    if isinstance(exc, BrokenResponse):
        return TargetFailure(
            pb.OUTCOME_ERROR, f"{name} sent a broken response: {exc}", protocol_error=True
        )
    assert isinstance(exc, OSError)
    return TargetFailure(
        pb.OUTCOME_UNAVAILABLE, f"could not connect to {name}: {exc.strerror or exc}", unsent=True
    )


def _cause(exc: BaseException | None) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f" ({exc.strerror.lower()})"
    return ""


def _ssl_reason(exc: BaseException) -> str:
    """The verifier's own words when there are some ("certificate has expired")."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return exc.verify_message
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc)
