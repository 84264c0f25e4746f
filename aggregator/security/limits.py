"""The global cap on upstream calls in flight (``server.max_upstream_inflight``).

Per-upstream bulkheads bound each upstream; this bounds their sum, so a burst of wide fan-outs
sheds load quickly (OUTCOME_REJECTED) instead of opening sockets without bound. It wraps the
Upstream seam, so every attempt (first, retry or hedge) of every kind of upstream holds a slot.
"""

from __future__ import annotations

import asyncio

from aggregator.errors import TargetFailure
from aggregator.plan import GrpcRequest, HttpRequest
from aggregator.upstreams import Reply, Upstream
from aggregator.v1 import aggregator_pb2 as pb

# A waiter gives up this long before its timeout, so it is rejected (the cap was the cause)
# rather than reported as a timeout by the timer around the whole attempt.
_GIVE_UP_EARLY = 0.005


class InflightCap:
    """At most ``limit`` upstream attempts at once; a waiter waits while its timeout allows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)
        self.inflight = 0
        self.waiting = 0

    def __repr__(self) -> str:
        return f"<InflightCap [{self.inflight}/{self.limit} in flight, {self.waiting} waiting]>"

    async def acquire(self, timeout: float) -> None:
        if self._slots.locked():
            await self._wait(timeout)
        else:
            await self._slots.acquire()
        self.inflight += 1

    async def _wait(self, timeout: float) -> None:
        self.waiting += 1
        try:
            async with asyncio.timeout(max(0.0, timeout - min(_GIVE_UP_EARLY, timeout / 4))):
                await self._slots.acquire()
        except TimeoutError:
            raise TargetFailure(
                pb.OUTCOME_REJECTED,
                f"{self.limit} upstream calls in flight (server.max_upstream_inflight) "
                "and none finished in time",
            ) from None
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self.inflight -= 1
        self._slots.release()


class CappedUpstream:
    """An Upstream whose calls each hold a slot of a shared InflightCap."""

    def __init__(self, upstream: Upstream, cap: InflightCap) -> None:
        self.name = upstream.name
        self._upstream = upstream
        self._cap = cap

    def __repr__(self) -> str:
        return f"<CappedUpstream {self._upstream!r} {self._cap!r}>"

    async def call(
        self, request: HttpRequest | GrpcRequest, timeout: float, request_id: str
    ) -> Reply:
        await self._cap.acquire(timeout)
        try:
            return await self._upstream.call(request, timeout, request_id)
        finally:
            self._cap.release()

    async def aclose(self) -> None:
        await self._upstream.aclose()
