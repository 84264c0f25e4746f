"""When a call must be done, and the alarm that ends an attempt at that time.

A target's deadline is fixed: the smaller of its own ``timeout`` and the call's deadline. A
coalesced call (policies/cache.py) is shared by callers with different deadlines, so its
deadline is the latest of its waiters' and moves later when a waiter with a later one joins;
each waiter still stops waiting at its own. Whatever reads a deadline reads ``at`` when it
decides, and the alarm of an attempt in flight follows a deadline that moved.
"""

from __future__ import annotations

import asyncio

from aggregator.timers import Timer, Timers


class Deadline:
    """A loop time, and the words for it in a TIMEOUT result (``target timeout 100ms``)."""

    __slots__ = ("at", "reason")

    def __init__(self, at: float, reason: str) -> None:
        self.at = at
        self.reason = reason

    def __repr__(self) -> str:
        return f"<Deadline {self.at:.3f} ({self.reason})>"

    def extend(self, other: Deadline) -> None:
        """Moves this deadline to ``other`` if that is later; never earlier."""
        if other.at > self.at:
            self.at = other.at
            self.reason = other.reason


class Alarm:
    """Cancels ``task`` at ``end`` (the upstream's own timeout) or at ``deadline``, whichever
    comes first, following ``deadline`` if it moves later while the attempt runs.

    ``rang`` once it cancelled the task; ``by_caller`` then says whether the deadline (the
    caller's limit) rang rather than the upstream's own timeout: only the latter says
    anything about the upstream's health; ``late``, by how many seconds the event loop ran it
    after its time (a stall here, not slowness there).
    """

    __slots__ = (
        "_deadline",
        "_end",
        "_set_for",
        "_task",
        "_timer",
        "_timers",
        "by_caller",
        "late",
        "rang",
    )

    def __init__(
        self, timers: Timers, task: asyncio.Task[object], end: float, deadline: Deadline
    ) -> None:
        self._timers = timers
        self._task = task
        self._end = end
        self._deadline = deadline
        self.rang = False
        self.by_caller = False
        self.late = 0.0
        self._set_for = min(end, deadline.at)
        self._timer: Timer = timers.call_at(self._set_for, self._ring)

    def __repr__(self) -> str:
        state = "rang" if self.rang else "set"
        return f"<Alarm {self._set_for:.3f} [{state}]>"

    def _ring(self) -> None:
        when = min(self._end, self._deadline.at)
        if when > self._set_for:  # a later waiter joined: the shared call goes on
            self._set_for = when
            self._timer = self._timers.call_at(when, self._ring)
            return
        self.rang = True
        self.late = self._timer.late
        self.by_caller = self._deadline.at < self._end
        self._task.cancel()

    def cancel(self) -> None:
        self._timer.cancel()
