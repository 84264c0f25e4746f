"""A clock that tests advance by hand (aggregator/timers.py's ``Clock``), so that no test sleeps
to let a breaker's reset, a cache entry's freshness, a keep-alive or an ejection run out."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable


class _Call:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """Time that passes only in ``advance``, which also runs the ``call_later`` callbacks that
    fall due, in order."""

    def __init__(self) -> None:
        self._monotonic = 1000.0
        self._wall = time.time()
        self._order = itertools.count()
        self._due: list[tuple[float, int, _Call]] = []

    def __repr__(self) -> str:
        return f"<ManualClock {self._monotonic:.3f} [{len(self._due)} pending]>"

    def monotonic(self) -> float:
        return self._monotonic

    def time(self) -> float:
        return self._wall

    def call_later(self, delay: float, callback: Callable[[], object]) -> _Call:
        call = _Call(callback)
        heapq.heappush(self._due, (self._monotonic + max(delay, 0.0), next(self._order), call))
        return call

    def advance(self, seconds: float) -> None:
        end = self._monotonic + seconds
        while self._due and self._due[0][0] <= end:
            when, _, call = heapq.heappop(self._due)
            self._wall += when - self._monotonic
            self._monotonic = when
            if not call.cancelled:
                call.callback()
        self._wall += end - self._monotonic
        self._monotonic = end
