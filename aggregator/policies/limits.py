"""Bulkhead (max_concurrency) and token-bucket rate limit, both wait-or-reject.

A call waits for a slot or a token only as long as its deadline allows; when it cannot get
one in time it is rejected at once (OUTCOME_REJECTED) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aggregator.errors import TargetFailure
from aggregator.v1 import aggregator_pb2 as pb


class Bulkhead:
    def __init__(self, upstream: str, limit: int) -> None:
        self._upstream = upstream
        self._limit = limit
        self._slots = asyncio.Semaphore(limit)
        self.inflight = 0

    def __repr__(self) -> str:
        return f"<Bulkhead {self._upstream} [{self.inflight}/{self._limit} in flight]>"

    @contextlib.asynccontextmanager
    async def slot(self, deadline: float) -> AsyncIterator[None]:
        """Holds one of ``limit`` slots; waits for one until the loop time ``deadline``."""
        if self._slots.locked():
            try:
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            except TimeoutError:
                raise TargetFailure(
                    pb.OUTCOME_REJECTED,
                    f"{self._upstream} has {self._limit} calls in flight (max_concurrency) "
                    "and none finished in time",
                ) from None
        else:
            await self._slots.acquire()
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self._slots.release()


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; a token is taken per attempt."""

    def __init__(self, upstream: str, rate: float, burst: int) -> None:
        self._upstream = upstream
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._loop = asyncio.get_running_loop()
        self._updated = self._loop.time()

    def __repr__(self) -> str:
        self._refill()
        return (
            f"<TokenBucket {self._upstream} [{self._tokens:.1f}/{self._burst:g}, {self._rate:g}/s]>"
        )

    async def take(self, deadline: float) -> None:
        """Takes a token, waiting for it while the loop time ``deadline`` allows, else rejects."""
        self._refill()
        # Tokens may go negative: each waiter reserves the token it will wait for, so
        # waiters are served in order and the rate holds.
        wait = (1.0 - self._tokens) / self._rate if self._tokens < 1.0 else 0.0
        if self._loop.time() + wait > deadline:
            raise TargetFailure(
                pb.OUTCOME_REJECTED,
                f"{self._upstream} is rate limited ({self._rate:g}/s, burst {self._burst:g}) "
                "and no token would come in time",
            )
        self._tokens -= 1.0
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                self._tokens += 1.0  # give the reservation back
                raise

    def _refill(self) -> None:
        now = self._loop.time()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
