"""Deadlines that share event-loop timers: one loop timer per millisecond, not one per call.

Every attempt runs under a timeout, and an aggregate of five targets would otherwise schedule
and cancel five loop timers, which is a large share of its cost (a uvloop timer is a libuv
handle: measured here at ~11K instructions to schedule and cancel, ``asyncio.timeout`` at ~31K).
Calls that start together have deadlines within the same millisecond, so ``Timers`` files them
in buckets keyed by that millisecond, each bucket behind one loop timer, cancelled when its
last deadline is.

A deadline fires at the end of its millisecond, never early and at most 1 ms late: libuv
schedules its own timers in whole milliseconds, so under uvloop nothing is lost. When the loop
itself was late (a stall), each fired Timer says by how much (``late``): a timeout that fired
only because this process was busy is not the upstream's (docs/resilience.md).

``Clock`` is the time of the policies that wait for time to pass (the breaker's reset, cache
freshness, keep-alive expiry, outlier ejection): ``SYSTEM_CLOCK`` in production, a clock that
tests advance by hand instead of sleeping.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Protocol

_RESOLUTION = 0.001  # seconds per bucket


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Time for policies: ``monotonic`` for durations and expiries, ``time`` for wall-clock
    stamps that outlive the process (cache entries in Redis), ``call_later`` to act when a
    duration has passed (a readmission, a sweep)."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], object]) -> Cancellable: ...


class SystemClock:
    """The process's clocks, and the running loop's timers."""

    def __repr__(self) -> str:
        return "<SystemClock>"

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def call_later(self, delay: float, callback: Callable[[], object]) -> Cancellable:
        return asyncio.get_running_loop().call_later(delay, callback)


SYSTEM_CLOCK: Clock = SystemClock()


class Timer:
    """One deadline in a bucket; ``expired`` once its callback has run, ``late`` then the
    seconds by which the loop ran it after its millisecond ended."""

    __slots__ = ("_bucket", "_callback", "expired", "late")

    def __init__(self, callback: Callable[[], object], bucket: _Bucket) -> None:
        self._callback = callback
        self._bucket = bucket
        self.expired = False
        self.late = 0.0

    def __repr__(self) -> str:
        state = "expired" if self.expired else "pending"
        return f"<Timer {self._callback!r} [{state}]>"

    def cancel(self) -> None:
        self._bucket.discard(self)


class _Bucket:
    """The deadlines of one millisecond, behind one loop timer."""

    __slots__ = ("_loop", "_owner", "_tick", "_timers", "handle")

    def __init__(self, owner: Timers, tick: int, loop: asyncio.AbstractEventLoop) -> None:
        self._owner = owner
        self._loop = loop
        self._tick = tick
        self._timers: dict[Timer, None] = {}  # insertion-ordered: fired in the order set
        self.handle: asyncio.TimerHandle | None = None

    def add(self, timer: Timer) -> None:
        self._timers[timer] = None

    def discard(self, timer: Timer) -> None:
        if timer in self._timers:
            del self._timers[timer]
            if not self._timers:
                self._owner.forget(self._tick, self)

    def fire(self) -> None:
        self.handle = None  # running now: nothing to cancel
        self._owner.forget(self._tick, self)
        late = max(0.0, self._loop.time() - self._tick * _RESOLUTION)
        for timer in list(self._timers):
            if timer in self._timers:  # not cancelled by an earlier callback
                del self._timers[timer]
                timer.expired = True
                timer.late = late
                timer._callback()


class Timers:
    """``call_at`` for deadlines, on buckets of one millisecond (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._buckets: dict[int, _Bucket] = {}

    def __repr__(self) -> str:
        pending = sum(len(bucket._timers) for bucket in self._buckets.values())
        return f"<Timers [{pending} deadlines in {len(self._buckets)} buckets]>"

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Runs ``callback`` at loop time ``when`` (rounded up to the millisecond) unless the
        returned Timer is cancelled first."""
        tick = math.ceil(when / _RESOLUTION)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = _Bucket(self, tick, self._loop)
            bucket.handle = self._loop.call_at(tick * _RESOLUTION, bucket.fire)
        timer = Timer(callback, bucket)
        bucket.add(timer)
        return timer

    def forget(self, tick: int, bucket: _Bucket) -> None:
        """Drops an empty or firing bucket, cancelling its loop timer if still pending."""
        if self._buckets.get(tick) is bucket:
            del self._buckets[tick]
        if bucket.handle is not None:
            bucket.handle.cancel()
            bucket.handle = None
