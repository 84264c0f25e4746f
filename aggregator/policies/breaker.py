"""A circuit breaker per upstream: pybreaker's own state machine, driven around coroutines.

pybreaker owns the state (closed, open, half-open, in its storage), the failure counter, the
transitions (closed -> open at ``fail_max`` failures in a row, open -> half-open once
``reset_timeout`` has passed, half-open -> closed or open on the trial's result) and the
listeners that report them. This module asks it before an attempt and tells it after:

- Before: ``pybreaker.CircuitBreaker.call`` with a generator function. pybreaker runs its state's
  own ``before_call`` (CircuitBreakerError while open and ``reset_timeout`` has not passed; the
  move to half-open once it has) and hands the generator back unstarted: nothing is counted.
- After: the attempt's result, through ``call`` again with a function that returns (a success)
  or raises (a failure), pybreaker's fast synchronous path.

What pybreaker cannot do for asyncio, and so is done here, minimally:

- It runs the guarded function synchronously inside ``call``; ``call_async`` needs tornado,
  holds a thread lock across the ``await`` and counts an unawaited half-open trial as a success.
  So the attempt is awaited here, between the two calls above.
- Half-open lets every call through; we let one trial be in flight at a time.
- An excluded exception counts as a success, and a cancellation as a failure; what says nothing
  of the upstream (policies/blame.py: a caller's bad input, our lateness, cancellation) is
  therefore never handed to it at all.
- Its clock is ``datetime.now(UTC)``, the wall clock, not injectable. The storage here keeps the
  time the circuit opened on our ``Clock`` (aggregator/timers.py) and hands pybreaker the wall
  time that is that long ago: its own comparison then measures our clock's elapsed time, which
  tests advance by hand and which no wall-clock step can move.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pybreaker

from aggregator.errors import TargetFailure
from aggregator.metrics import CIRCUIT_STATES
from aggregator.timers import SYSTEM_CLOCK, Clock
from aggregator.v1 import aggregator_pb2 as pb

log = logging.getLogger("aggregator.breaker")


class _Fault(Exception):
    """What we hand pybreaker to count one failure."""


class _ClockedStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage, with the time the circuit opened kept on ``clock``."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self._clock = clock
        self._opened: float | None = None

    @property
    def opened_at(self) -> datetime | None:
        if self._opened is None:
            return None
        return datetime.now(UTC) - timedelta(seconds=self._clock.monotonic() - self._opened)

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:  # pybreaker passes its wall-clock now
        self._opened = self._clock.monotonic()

    def open_for(self) -> float:
        """Seconds since the circuit last opened (0 if it never did)."""
        return 0.0 if self._opened is None else self._clock.monotonic() - self._opened


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
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._upstream = upstream
        self._on_state = on_state
        self._storage = _ClockedStorage(clock)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            state_storage=self._storage,
            listeners=[_StateListener(self._changed)],
            name=upstream,
        )
        self._trial_in_flight = False
        # Closed, as pybreaker's listener last said: the common case checked without going
        # through pybreaker's properties and lock on every attempt.
        self._closed = True
        on_state(CIRCUIT_STATES["closed"])

    def __repr__(self) -> str:
        return (
            f"<Breaker {self._upstream} [{self.state}, {self._cb.fail_counter}/"
            f"{self._cb.fail_max} failures{', trial in flight' if self._trial_in_flight else ''}]>"
        )

    @property
    def state(self) -> str:
        return self._cb.current_state

    def admit(self) -> bool:
        """Lets an attempt go (True if it is the half-open trial) or raises CIRCUIT_OPEN."""
        if self._closed:
            return False
        if self._trial_in_flight:
            raise self._open_failure()
        try:
            self._cb.call(_unstarted)  # pybreaker's own before_call: open, or now half-open
        except pybreaker.CircuitBreakerError:
            raise self._open_failure() from None
        if self._closed:  # closed meanwhile (another trial's success)
            return False
        self._trial_in_flight = True
        return True

    def record(self, trial: bool, failed: bool | None) -> None:
        """Records an attempt's result: True failed, False succeeded, None says nothing."""
        if trial:
            self._trial_in_flight = False
        if failed is None:
            return
        if self._closed:
            if not failed and self._cb.fail_counter == 0:
                return  # the common case: a success changes nothing
        elif not trial:
            return  # open or half-open: only the trial's result decides
        with contextlib.suppress(_Fault, pybreaker.CircuitBreakerError):
            self._cb.call(_raise if failed else _succeed)

    def _open_failure(self) -> TargetFailure:
        if self._trial_in_flight:
            detail = "a trial call is in flight"
        else:
            left = self._cb.reset_timeout - self._storage.open_for()
            detail = f"retrying in {max(left, 0):.1f}s"
        return TargetFailure(
            pb.OUTCOME_CIRCUIT_OPEN,
            f"circuit breaker for {self._upstream} is open ({detail}); not called",
        )

    def _changed(self, old: str, new: str) -> None:
        self._closed = new == pybreaker.STATE_CLOSED
        log.warning(
            "circuit breaker for %s: %s -> %s", self._upstream, old or "start", new,
            extra={"event": "circuit_state", "upstream": self._upstream, "state": new},
        )  # fmt: skip
        self._on_state(CIRCUIT_STATES[new])


def _unstarted() -> Iterator[None]:
    """Handed to pybreaker's ``call`` to ask whether an attempt may go: a generator function,
    so pybreaker returns its wrapper unstarted and counts nothing."""
    yield


def _raise() -> None:
    raise _Fault


def _succeed() -> None:
    return None
