"""A retry budget per upstream, after Finagle's RetryBudget.

Retries (and hedges) may be at most ``ratio`` of the requests of the last ``window`` seconds,
plus a floor of ``min_per_second`` so a quiet upstream can still retry. In an outage every
first attempt fails, and the budget keeps retries from multiplying the load on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class RetryBudget:
    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ratio = ratio
        self._floor = min_per_second * window
        self._slots = 10
        self._slot_seconds = window / self._slots
        self._clock = clock
        self._requests = [0] * self._slots
        self._retries = [0] * self._slots
        self._epoch = self._slot()

    def __repr__(self) -> str:
        self._advance()
        return (
            f"<RetryBudget [{sum(self._retries)} retries / {sum(self._requests)} requests, "
            f"ratio {self._ratio:g}, floor {self._floor:g}]>"
        )

    def record_request(self) -> None:
        """Counts one first attempt: it earns ``ratio`` of a retry."""
        self._requests[self._advance()] += 1

    def try_withdraw(self) -> bool:
        """Takes one retry from the budget; False when it is spent."""
        index = self._advance()
        allowed = math.floor(self._ratio * sum(self._requests) + self._floor)
        if sum(self._retries) >= allowed:
            return False
        self._retries[index] += 1
        return True

    def _slot(self) -> int:
        return int(self._clock() / self._slot_seconds)

    def _advance(self) -> int:
        """Clears the slots that fell out of the window; returns the current slot's index."""
        now = self._slot()
        for stale in range(max(self._epoch + 1, now - self._slots + 1), now + 1):
            self._requests[stale % self._slots] = 0
            self._retries[stale % self._slots] = 0
        self._epoch = max(self._epoch, now)
        return now % self._slots
