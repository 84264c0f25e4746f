"""REST upstreams: one pooled aiohttp ClientSession per upstream, alive as long as the server."""

from __future__ import annotations

import email.utils
import ssl
from datetime import UTC, datetime

import aiohttp
from yarl import URL

from aggregator.config import UpstreamConfig
from aggregator.errors import TargetFailure
from aggregator.plan import GrpcRequest, HttpRequest
from aggregator.security.files import Watched
from aggregator.security.tls import ssl_context, upstream_files
from aggregator.upstreams import Reply
from aggregator.v1 import aggregator_pb2 as pb

_CHUNK = 64 * 1024


class HttpUpstream:
    """Calls one configured base URL; the only host it ever contacts is that URL's host."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.name = config.name
        self._base = config.url
        self._host = URL(config.url).host
        self._connect_timeout = config.connect_timeout
        self._max_response_bytes = config.max_response_bytes
        self._urls: dict[str, URL] = {}
        tls = config.tls
        # Re-read when the files change; each request takes the current context (rotation).
        self._tls = (
            Watched(f"upstreams.{config.name}.tls", upstream_files(tls), lambda: ssl_context(tls))
            if tls is not None
            else None
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=config.max_concurrency, keepalive_timeout=30, ttl_dns_cache=60
            ),
            # The total time is enforced by the caller (asyncio.timeout around call()), so
            # a deadline, a per-target timeout and the upstream's own timeout are one mechanism.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout),
            # Shared by every caller: an upstream's Set-Cookie must never ride on another
            # caller's request (or this one's next). Cookies pass through as headers only.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            raise_for_status=False,
            skip_auto_headers=("User-Agent",),
        )

    def __repr__(self) -> str:
        connector = self._session.connector
        limit = connector.limit if connector else 0
        return f"<HttpUpstream {self.name} {self._base} [limit {limit}]>"

    async def call(
        self, request: HttpRequest | GrpcRequest, timeout: float, request_id: str
    ) -> Reply:
        assert isinstance(request, HttpRequest)
        url = self._url(request.path)
        headers = dict(request.headers)
        headers["X-Request-Id"] = request_id
        try:
            async with self._session.request(
                request.method,
                url,
                params=request.query or None,
                headers=headers,
                data=request.body,
                allow_redirects=False,  # a redirect could lead anywhere: it is the answer
                ssl=self._tls.current() if self._tls is not None else True,
            ) as response:
                declared = response.content_length
                if declared is not None and declared <= self._max_response_bytes:
                    body = await response.read()  # the common case: one read of that length
                else:
                    body = await self._read(response, request.method)
        except aiohttp.ClientError as exc:  # transport errors become outcomes; never Cancelled
            raise _target_failure(exc, self.name, self._connect_timeout) from exc
        status = response.status
        return Reply(
            ok=200 <= status < 300,
            body=body,
            http_status=status,
            content_type=response.headers.get("Content-Type", ""),
            cache_control=response.headers.get("Cache-Control", ""),
            reason=_reason(status, response.reason),
            retry_after=_retry_after(response.headers.get("Retry-After"))
            if status >= 400
            else None,
        )

    def _url(self, path: str) -> URL:
        """The URL of ``path`` on this upstream, parsed once per distinct path (bounded)."""
        url = self._urls.get(path)
        if url is None:
            url = URL(self._base + path)
            if url.host != self._host:  # unreachable after validation; kept as the last fence
                raise TargetFailure(pb.OUTCOME_ERROR, f"path {path!r} leaves the upstream")
            if len(self._urls) >= 4096:
                self._urls.clear()
            self._urls[path] = url
        return url

    async def _read(self, response: aiohttp.ClientResponse, method: str) -> bytes:
        """The body, read as it arrives and abandoned past max_response_bytes, so an upstream
        cannot make the server buffer more than that (a declared length is refused at once)."""
        cap = self._max_response_bytes
        declared = response.content_length
        if method != "HEAD" and declared is not None and declared > cap:
            response.close()
            raise self._too_large(response.status, f"announced {declared} bytes")
        if declared is not None:  # within the cap (HEAD: the length of what GET would send)
            return await response.read()
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > cap:
                response.close()  # the rest is never read: the connection is dropped
                raise self._too_large(response.status, f"sent more than {cap} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, status: int, what: str) -> TargetFailure:
        return TargetFailure(
            pb.OUTCOME_ERROR,
            f"response too large: {self.name} {what} "
            f"(upstreams.{self.name}.max_response_bytes is {self._max_response_bytes})",
            http_status=status,
        )

    async def aclose(self) -> None:
        await self._session.close()


def _reason(status: int, phrase: str | None) -> str:
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


def _target_failure(exc: aiohttp.ClientError, name: str, connect_timeout: float) -> TargetFailure:
    """The outcome an aiohttp transport error stands for, in one sentence (most specific first:
    the certificate and timeout errors are also connector errors)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        why = _ssl_reason(exc.certificate_error)
        return TargetFailure(
            pb.OUTCOME_UNAVAILABLE, f"could not verify {name}'s TLS certificate: {why}"
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return TargetFailure(
            pb.OUTCOME_UNAVAILABLE, f"TLS handshake with {name} failed: {_ssl_reason(exc)}"
        )
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return TargetFailure(
            pb.OUTCOME_UNAVAILABLE,
            f"could not connect to {name} within connect_timeout {connect_timeout * 1000:g}ms",
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TargetFailure(
            pb.OUTCOME_UNAVAILABLE,
            f"could not connect to {name}: {exc.os_error.strerror or exc.os_error}",
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TargetFailure(
            pb.OUTCOME_UNAVAILABLE, f"{name} closed the connection before answering"
        )
    if isinstance(exc, aiohttp.ClientPayloadError):
        return TargetFailure(pb.OUTCOME_UNAVAILABLE, f"{name} broke off the response body: {exc}")
    if isinstance(exc, aiohttp.ClientOSError):
        return TargetFailure(
            pb.OUTCOME_UNAVAILABLE, f"connection to {name} failed: {exc.strerror or exc}"
        )
    return TargetFailure(pb.OUTCOME_ERROR, f"{name} sent a broken response: {exc}")


def _ssl_reason(exc: BaseException) -> str:
    """The verifier's own words when there are some ("certificate has expired")."""
    cause: BaseException = getattr(exc, "os_error", None) or exc.__cause__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        return cause.verify_message
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return cause.reason.lower().replace("_", " ")
    return str(cause)
