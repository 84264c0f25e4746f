"""Response cache per upstream (``cache``), and coalescing of identical calls in flight.

Only GET and HEAD answered with 2xx are stored, under a key covering the upstream, method,
path, query, body and every request header except per-request ones (X-Request-Id, tracing):
an ``Authorization`` header therefore keys its own entry, and one caller's answer never reaches
another. The upstream's ``Cache-Control`` is honoured: ``no-store``, ``no-cache`` and
``private`` are not stored, and ``max-age``/``s-maxage`` shorten the configured ``ttl``.
An entry past its ttl is kept ``stale_if_error`` longer and served (as STALE) only when the
upstream fails.

Backends: in-process memory (LRU, bounded in entries and bytes; the default) or Redis
(``backend: redis``), shared by every replica; a Redis that fails is a cache miss, never a
failed call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aggregator.config import CachePolicy
from aggregator.plan import GrpcRequest, HttpRequest
from aggregator.upstreams import Reply

log = logging.getLogger("aggregator.cache")

_PER_REQUEST_HEADERS = frozenset({"x-request-id", "traceparent", "tracestate", "baggage"})
_MAX_AGE = re.compile(r"(?:^|,)\s*(s-maxage|max-age)\s*=\s*\"?(\d+)")
_NO_STORE = re.compile(r"(?:^|,)\s*(no-store|no-cache|private)\b")
_HEADER = struct.Struct("!ddH")  # stored_at, fresh_until, http status


@dataclass(frozen=True, slots=True)
class Entry:
    reply: Reply
    stored_at: float
    fresh_until: float

    def fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def encode(self) -> bytes:
        content_type = self.reply.content_type.encode()
        return (
            _HEADER.pack(self.stored_at, self.fresh_until, self.reply.http_status)
            + struct.pack("!H", len(content_type))
            + content_type
            + self.reply.body
        )

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        stored_at, fresh_until, status = _HEADER.unpack_from(data)
        offset = _HEADER.size
        (length,) = struct.unpack_from("!H", data, offset)
        offset += 2
        content_type = data[offset : offset + length].decode()
        reply = Reply(
            ok=True, body=data[offset + length :], http_status=status, content_type=content_type
        )
        return cls(reply=reply, stored_at=stored_at, fresh_until=fresh_until)


class Backend(Protocol):
    async def get(self, key: bytes) -> Entry | None: ...

    async def put(self, key: bytes, entry: Entry, keep_for: float) -> None: ...

    async def aclose(self) -> None: ...


class MemoryBackend:
    """LRU bounded by entries and bytes; entries past their stale window are dropped on read."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._entries: OrderedDict[bytes, tuple[Entry, float]] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0

    def __repr__(self) -> str:
        return f"<MemoryBackend [{len(self._entries)} entries, {self._bytes} bytes]>"

    async def get(self, key: bytes) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        entry, expires = found
        if time.time() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    async def put(self, key: bytes, entry: Entry, keep_for: float) -> None:
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (entry, entry.stored_at + keep_for)
        self._bytes += len(entry.reply.body)
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        entry, _ = self._entries.pop(key)
        self._bytes -= len(entry.reply.body)

    async def aclose(self) -> None:
        self._entries.clear()
        self._bytes = 0


class RedisBackend:
    """Entries shared by every replica, expiring in Redis when their stale window ends."""

    def __init__(self, url: str, namespace: str) -> None:
        import redis.asyncio as aioredis

        self._client: Any = aioredis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25)
        self._namespace = f"aggregator:cache:{namespace}:".encode()
        self._url = url

    def __repr__(self) -> str:
        return f"<RedisBackend {self._url}>"

    async def get(self, key: bytes) -> Entry | None:
        try:
            data = await self._client.get(self._namespace + key)
        except Exception as exc:  # the cache is an optimisation: a broken Redis is a miss
            log.warning("redis cache read failed: %s", exc)
            return None
        return Entry.decode(data) if data else None

    async def put(self, key: bytes, entry: Entry, keep_for: float) -> None:
        try:
            await self._client.set(
                self._namespace + key, entry.encode(), px=math.ceil(keep_for * 1000)
            )
        except Exception as exc:
            log.warning("redis cache write failed: %s", exc)

    async def aclose(self) -> None:
        await self._client.aclose()


class ResponseCache:
    def __init__(self, upstream: str, policy: CachePolicy) -> None:
        self.policy = policy
        self.backend: Backend = (
            RedisBackend(policy.redis_url, upstream)
            if policy.backend == "redis"
            else MemoryBackend(policy.max_entries, policy.max_bytes)
        )

    def __repr__(self) -> str:
        return f"<ResponseCache ttl {self.policy.ttl:g}s {self.backend!r}>"

    @staticmethod
    def cacheable(request: HttpRequest | GrpcRequest) -> bool:
        return isinstance(request, HttpRequest) and request.method in ("GET", "HEAD")

    async def get(self, key: bytes) -> Entry | None:
        return await self.backend.get(key)

    async def store(self, key: bytes, reply: Reply) -> None:
        """Stores a 2xx reply unless its Cache-Control forbids it."""
        ttl = _ttl(self.policy.ttl, reply.cache_control)
        if not reply.ok or ttl <= 0 or len(reply.body) > self.policy.max_bytes // 8:
            return
        now = time.time()
        entry = Entry(reply=reply, stored_at=now, fresh_until=now + ttl)
        await self.backend.put(key, entry, ttl + self.policy.stale_if_error)

    def stale_usable(self, entry: Entry, now: float) -> bool:
        return now < entry.fresh_until + self.policy.stale_if_error

    async def aclose(self) -> None:
        await self.backend.aclose()


def cache_key(upstream: str, request: HttpRequest) -> bytes:
    digest = hashlib.sha256()
    for part in (upstream, request.method, request.path):
        digest.update(part.encode() + b"\0")
    for name, value in request.query:
        digest.update(f"q:{name}={value}\0".encode())
    headers = sorted(
        (name.lower(), value)
        for name, value in request.headers
        if name.lower() not in _PER_REQUEST_HEADERS
    )
    for name, value in headers:
        digest.update(f"h:{name}={value}\0".encode())
    digest.update(request.body or b"")
    return digest.hexdigest().encode()


def _ttl(configured: float, cache_control: str) -> float:
    if not cache_control:
        return configured
    lowered = cache_control.lower()
    if _NO_STORE.search(lowered):
        return 0.0
    ages = dict(_MAX_AGE.findall(lowered))
    age = ages.get("s-maxage", ages.get("max-age"))
    return min(configured, float(age)) if age is not None else configured


class Coalescer:
    """Identical calls in flight share one upstream call.

    The shared call runs in its own task; each caller waits on it through ``asyncio.shield``,
    so a caller that goes away does not cancel it for the others. When the last caller has
    gone, the shared call is cancelled: nobody wants its answer any more.
    """

    def __init__(self) -> None:
        self._calls: dict[bytes, tuple[asyncio.Task[Any], list[int]]] = {}

    def __repr__(self) -> str:
        return f"<Coalescer [{len(self._calls)} shared calls in flight]>"

    async def run(self, key: bytes, call: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """The result of ``call()``, shared with identical calls in flight; and whether this
        caller joined a call another had started."""
        shared = self._calls.get(key)
        joined = shared is not None
        if shared is None:
            task = asyncio.ensure_future(call())
            shared = (task, [0])
            self._calls[key] = shared
            task.add_done_callback(lambda _: self._forget(key, task))
        task, waiters = shared
        waiters[0] += 1
        try:
            return await asyncio.shield(task), joined
        finally:
            waiters[0] -= 1
            if waiters[0] == 0 and not task.done():
                task.cancel()
                await asyncio.wait([task])

    def _forget(self, key: bytes, task: asyncio.Task[Any]) -> None:
        if self._calls.get(key, (None,))[0] is task:
            del self._calls[key]
