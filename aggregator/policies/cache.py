"""Response cache per upstream (``cache``), and coalescing of identical calls in flight.

Only GET and HEAD answered with 2xx are stored, under a key covering exactly what is sent:
the upstream (its name, kind, address and TLS files, and ``key_prefix``), method, path, every
query pair, every request header (caller-set ``traceparent``, ``tracestate`` and ``baggage``
too) and the body, plus what our own tracing sends besides its per-attempt ``traceparent``
(a ``tracestate`` the caller chose reaches the upstream that way). Only X-Request-Id
(replaced by ours on the wire) and that ``traceparent`` are left out. The parts are hashed
in an unambiguous encoding, so no value can pose as another part: an ``Authorization``
header keys its own entry, and one caller's answer never reaches a caller whose request
differs. The upstream's ``Cache-Control`` is honoured: ``no-store``,
``no-cache`` and ``private`` are not stored, and ``max-age``/``s-maxage`` shorten the
configured ``ttl``.
An entry past its ttl is kept ``stale_if_error`` longer and served (as STALE) only when the
upstream fails.

Backends: in-process memory (LRU, bounded in entries and bytes; the default) or Redis
(``backend: redis``), shared by every replica; a Redis that fails is a cache miss, never a
failed call. Two deployments sharing a Redis share entries only for upstreams with the same
name, address, TLS files and ``key_prefix``; set a ``key_prefix`` per deployment when the same
address may answer them differently (a client certificate's identity, a source address).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from aggregator.config import CachePolicy, UpstreamConfig
from aggregator.plan import GrpcRequest, HttpRequest
from aggregator.policies.deadline import Deadline
from aggregator.timers import SYSTEM_CLOCK, Clock
from aggregator.upstreams import Reply

log = logging.getLogger("aggregator.cache")

_KEY_VERSION = b"aggregator.cache.v2"
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

    def __init__(self, max_entries: int, max_bytes: int, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
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
        if self._clock.time() >= expires:
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
    def __init__(
        self, upstream: UpstreamConfig, policy: CachePolicy, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.policy = policy
        # Wall-clock time: entries in Redis are read by other replicas and processes.
        self._clock = clock
        self.namespace = namespace(upstream, policy)
        readable = f"{policy.key_prefix}:{upstream.name}" if policy.key_prefix else upstream.name
        self.backend: Backend = (
            RedisBackend(policy.redis_url, readable)
            if policy.backend == "redis"
            else MemoryBackend(policy.max_entries, policy.max_bytes, clock)
        )

    def __repr__(self) -> str:
        return f"<ResponseCache ttl {self.policy.ttl:g}s {self.backend!r}>"

    @staticmethod
    def cacheable(request: HttpRequest | GrpcRequest) -> bool:
        return isinstance(request, HttpRequest) and request.method in ("GET", "HEAD")

    def key(self, request: HttpRequest | GrpcRequest, trace: Iterable[tuple[str, str]]) -> bytes:
        """The key of ``request`` sent with our tracing headers ``trace`` (see cache_key)."""
        return cache_key(self.namespace, request, trace)

    async def get(self, key: bytes) -> Entry | None:
        return await self.backend.get(key)

    async def store(self, key: bytes, reply: Reply) -> None:
        """Stores a 2xx reply unless its Cache-Control forbids it."""
        ttl = _ttl(self.policy.ttl, reply.cache_control)
        if not reply.ok or ttl <= 0 or len(reply.body) > self.policy.max_bytes // 8:
            return
        now = self._clock.time()
        entry = Entry(reply=reply, stored_at=now, fresh_until=now + ttl)
        await self.backend.put(key, entry, ttl + self.policy.stale_if_error)

    def stale_usable(self, entry: Entry, now: float) -> bool:
        return now < entry.fresh_until + self.policy.stale_if_error

    async def aclose(self) -> None:
        await self.backend.aclose()


def namespace(upstream: UpstreamConfig, policy: CachePolicy) -> bytes:
    """What tells this upstream's entries from another's, in a Redis other deployments share."""
    tls = upstream.tls
    return hashlib.sha256(
        _encoded(
            (
                _KEY_VERSION,
                policy.key_prefix.encode(),
                upstream.name.encode(),
                upstream.kind.encode(),
                upstream.url.encode(),
                upstream.address.encode(),
                *((tls.ca.encode(), tls.cert.encode(), tls.key.encode()) if tls else ()),
            )
        )
    ).digest()


def cache_key(
    namespace: bytes, request: HttpRequest | GrpcRequest, trace: Iterable[tuple[str, str]] = ()
) -> bytes:
    """A hash of exactly what goes upstream: the X-Request-Id the caller set is left out (we
    send ours instead), as is our per-attempt ``traceparent``; ``trace`` is the rest of our
    tracing headers.

    What is hashed is the ``repr`` of a tuple of str, bytes and tuples: an unambiguous
    encoding (``ast.literal_eval`` reads it back), so no value can pose as a boundary
    (``a=1\0q:b=2`` stays one query value), made in C on the hot path of a cached upstream.
    """
    if isinstance(request, HttpRequest):
        sent: tuple[object, ...] = (
            "http",
            request.method,
            request.path,
            request.query,
            _without(request.headers, "x-request-id"),
            request.body,
        )
    else:
        sent = ("grpc", request.method, _without(request.metadata, "x-request-id"), request.request)
    digest = hashlib.sha256(namespace)
    digest.update(repr((sent, _without(tuple(trace), "traceparent"))).encode())
    return digest.hexdigest().encode()


def _without(pairs: tuple[tuple[str, str], ...], name: str) -> tuple[tuple[str, str], ...]:
    """``pairs`` without those called ``name`` (any case): what we replace or add per attempt."""
    if not any(key.lower() == name for key, _ in pairs):
        return pairs
    return tuple(pair for pair in pairs if pair[0].lower() != name)


def _encoded(parts: Iterable[bytes]) -> bytes:
    """Each part after its length: an injective encoding of the sequence."""
    return b"".join(len(part).to_bytes(8, "big") + part for part in parts)


def _ttl(configured: float, cache_control: str) -> float:
    if not cache_control:
        return configured
    lowered = cache_control.lower()
    if _NO_STORE.search(lowered):
        return 0.0
    ages = dict(_MAX_AGE.findall(lowered))
    age = ages.get("s-maxage", ages.get("max-age"))
    return min(configured, float(age)) if age is not None else configured


class _Shared:
    """One call in flight, its waiters, and the deadline it runs under: the latest of theirs."""

    __slots__ = ("deadline", "task", "waiters")

    def __init__(self, task: asyncio.Task[Any], deadline: Deadline) -> None:
        self.task = task
        self.deadline = deadline
        self.waiters = 0


class Coalescer:
    """Identical calls in flight share one upstream call.

    The shared call runs in its own task under the latest deadline among its waiters (each
    attempt still bounded by the upstream's own timeout): a waiter with a later deadline that
    joins moves it later. Each waiter stops waiting at its own deadline (TimeoutError) or when
    it is cancelled, without cancelling the call for the others; when the last waiter has
    gone, the shared call is cancelled and awaited: nobody wants its answer any more.
    """

    def __init__(self) -> None:
        self._calls: dict[bytes, _Shared] = {}

    def __repr__(self) -> str:
        return f"<Coalescer [{len(self._calls)} shared calls in flight, {self.waiting} waiting]>"

    @property
    def waiting(self) -> int:
        """Callers waiting on a shared call, all calls together."""
        return sum(shared.waiters for shared in self._calls.values())

    async def run(
        self, key: bytes, deadline: Deadline, call: Callable[[Deadline], Awaitable[Any]]
    ) -> tuple[Any, bool]:
        """The result of ``call(shared deadline)``, shared with identical calls in flight; and
        whether this caller joined a call another had started. Raises TimeoutError when
        ``deadline`` comes first."""
        shared = self._calls.get(key)
        joined = shared is not None
        if shared is None:
            # A copy: the shared deadline moves with later waiters, this caller's does not.
            limit = Deadline(deadline.at, deadline.reason)
            shared = self._calls[key] = _Shared(asyncio.ensure_future(call(limit)), limit)
            task = shared.task
            task.add_done_callback(lambda _: self._forget(key, task))
        else:
            shared.deadline.extend(deadline)
        task = shared.task
        shared.waiters += 1
        try:
            if not task.done():
                timeout = deadline.at - asyncio.get_running_loop().time()
                await asyncio.wait((task,), timeout=max(timeout, 0.0))
            if not task.done():
                raise TimeoutError
            return task.result(), joined
        finally:
            shared.waiters -= 1
            if shared.waiters == 0 and not task.done():
                # Offered no more before it is cancelled: a newcomer joining a call being
                # cancelled would get a CancelledError it never asked for.
                self._forget(key, task)
                task.cancel()
                await asyncio.wait((task,))

    def _forget(self, key: bytes, task: asyncio.Task[Any]) -> None:
        shared = self._calls.get(key)
        if shared is not None and shared.task is task:
            del self._calls[key]
