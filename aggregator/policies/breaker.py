"""A circuit breaker per upstream: pybreaker owns the state, we drive it around coroutines.

pybreaker is synchronous (its ``call_async`` needs tornado and miscounts, and it lets every
call through in half-open). So we ask before an attempt whether it may go, letting exactly one
trial through in half-open, ``await`` the attempt, then record its result with pybreaker's
fast synchronous calls. Cancellation is never counted.

What counts as a failure: connect failures, resets, timeouts, HTTP 5xx, and gRPC UNAVAILABLE,
DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, DATA_LOSS. Not 4xx, 429 or other gRPC codes: those say
the upstream is up and answering.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import pybreaker

from aggregator.errors import TargetFailure
from aggregator.metrics import CIRCUIT_STATES
from aggregator.v1 import aggregator_pb2 as pb

log = logging.getLogger("aggregator.breaker")


class _Fault(Exception):
    """What we hand pybreaker to count one failure."""


class _StateListener(pybreaker.CircuitBreakerListener):
    def __init__(self, on_change: Callable[[str, str], None]) -> None:
        self._on_change = on_change

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._on_change(old_state.name if old_state else "", new_state.name)


class Breaker:
    def __init__(
        self,
        upstream: str,
        fail_max: int,
        reset_timeout: float,
        on_state: Callable[[int], None] = lambda state: None,
    ) -> None:
        self._upstream = upstream
        self._on_state = on_state
        self._storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            state_storage=self._storage,
            listeners=[_StateListener(self._changed)],
            name=upstream,
        )
        self._trial_in_flight = False
        # pybreaker's state, mirrored by the listener: reading it through pybreaker's
        # properties on every attempt is a noticeable share of a closed breaker's cost.
        self._state = pybreaker.STATE_CLOSED
        on_state(CIRCUIT_STATES["closed"])

    def __repr__(self) -> str:
        return (
            f"<Breaker {self._upstream} [{self.state}, {self._cb.fail_counter}/"
            f"{self._cb.fail_max} failures{', trial in flight' if self._trial_in_flight else ''}]>"
        )

    @property
    def state(self) -> str:
        return self._state

    def admit(self) -> bool:
        """Lets an attempt go (True if it is the half-open trial) or raises CIRCUIT_OPEN."""
        state = self._state
        if state == pybreaker.STATE_CLOSED:
            return False
        if state == pybreaker.STATE_OPEN and self._reopens_in() > 0:
            raise self._open_failure()
        if self._trial_in_flight:
            raise self._open_failure()
        if state == pybreaker.STATE_OPEN:
            self._cb.half_open()
        self._trial_in_flight = True
        return True

    def record(self, trial: bool, failed: bool | None) -> None:
        """Records an attempt's result: True failed, False succeeded, None says nothing."""
        if trial:
            self._trial_in_flight = False
        state = self.state
        # In half-open only the trial decides; late results of older attempts say nothing.
        if failed is None or state == pybreaker.STATE_OPEN:
            return
        if not failed and state == pybreaker.STATE_CLOSED and self._cb.fail_counter == 0:
            return  # the common case: a success changes nothing
        if state == pybreaker.STATE_HALF_OPEN and not trial:
            return
        with contextlib.suppress(_Fault, pybreaker.CircuitBreakerError):
            self._cb.call(_raise if failed else _succeed)

    def _reopens_in(self) -> float:
        opened_at = self._storage.opened_at
        if opened_at is None:
            return 0.0
        elapsed = (datetime.now(UTC) - opened_at).total_seconds()
        return self._cb.reset_timeout - elapsed

    def _open_failure(self) -> TargetFailure:
        if self._trial_in_flight:
            detail = "a trial call is in flight"
        else:
            detail = f"retrying in {max(self._reopens_in(), 0):.1f}s"
        return TargetFailure(
            pb.OUTCOME_CIRCUIT_OPEN,
            f"circuit breaker for {self._upstream} is open ({detail}); not called",
        )

    def _changed(self, old: str, new: str) -> None:
        self._state = new
        log.warning(
            "circuit breaker for %s: %s -> %s", self._upstream, old or "start", new,
            extra={"event": "circuit_state", "upstream": self._upstream, "state": new},
        )  # fmt: skip
        self._on_state(CIRCUIT_STATES[new])


def _raise() -> None:
    raise _Fault


def _succeed() -> None:
    return None
