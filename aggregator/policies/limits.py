"""Bulkhead (max_concurrency) and token-bucket rate limit, both wait-or-reject.

A call waits for a slot or a token only as long as its deadline allows; when it cannot get
one in time it is rejected at once (OUTCOME_REJECTED) instead of queueing without bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

from aggregator.errors import TargetFailure
from aggregator.policies.deadline import Deadline
from aggregator.v1 import aggregator_pb2 as pb


class Bulkhead:
    """At most ``limit`` attempts in flight. Per upstream (``max_concurrency``), and once for
    all upstreams together (``server.max_upstream_inflight``), so a burst of wide fan-outs
    sheds load quickly instead of opening sockets without bound.

    A counter with a queue of waiters rather than an asyncio.Semaphore: taking a free slot is
    a comparison on the hot path, and a released slot is handed to the first waiter (FIFO).
    """

    def __init__(self, name: str, limit: int, refusal: str) -> None:
        self._name = name
        self.limit = limit
        self._refusal = refusal  # the error sentence of an attempt that got no slot in time
        self.inflight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def __repr__(self) -> str:
        return (
            f"<Bulkhead {self._name} [{self.inflight}/{self.limit} in flight, "
            f"{self.waiting} waiting]>"
        )

    @property
    def waiting(self) -> int:
        return sum(not waiter.done() for waiter in self._waiters)

    def try_acquire(self) -> bool:
        """Takes a free slot if there is one (and nobody is queued before us)."""
        if self.inflight < self.limit and not self._waiters:
            self.inflight += 1
            return True
        return False

    async def acquire(self, deadline: float | Deadline) -> None:
        """Takes a slot, waiting for one until the loop time ``deadline``, else REJECTED.
        A ``Deadline`` that moves later while this waits (a coalesced call's) is followed."""
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        at = _at(deadline)
        while True:
            try:
                async with asyncio.timeout_at(at):
                    await waiter  # release() hands its slot over: inflight stays counted
                return
            except TimeoutError:
                if waiter.done() and not waiter.cancelled():
                    return  # the slot came just as the time ran out: take it
                if _at(deadline) <= at:
                    self._leave(waiter)
                    raise TargetFailure(pb.OUTCOME_REJECTED, self._refusal) from None
                at = _at(deadline)  # moved later: wait on, in the same place in line
                waiter = self._replace(waiter)
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self.release()  # a slot arrived just as this waiter gave up: pass it on
                else:
                    self._leave(waiter)
                raise

    def _replace(self, waiter: asyncio.Future[None]) -> asyncio.Future[None]:
        fresh: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._waiters[self._waiters.index(waiter)] = fresh
        except ValueError:  # release() passed it over (cancelled) from the front of the line
            self._waiters.appendleft(fresh)
            if self.inflight < self.limit:  # ... and left the slot free: take it now
                self._waiters.remove(fresh)
                self.inflight += 1
                fresh.set_result(None)
        return fresh

    def _leave(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def release(self) -> None:
        if self.inflight <= self.limit:  # over a limit that shrank: the slot is not handed on
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self.inflight -= 1

    def resize(self, limit: int) -> None:
        """A new limit (an adaptive one's): slots it frees go to the waiters, in order."""
        self.limit = limit
        while self._waiters and self.inflight < limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.inflight += 1
                waiter.set_result(None)


class GradientLimit:
    """``max_concurrency: auto``: a concurrency limit that follows the upstream's latency.

    Netflix concurrency-limits' Gradient2 (concurrency-limits-core/.../limit/Gradient2Limit.java,
    and the ideas of Envoy's adaptive concurrency filter): each answered attempt's latency is a
    short-term sample, compared with a long-term exponential average of them (600 samples, the
    first 10 a plain mean) that stands for the upstream's latency without queueing::

        gradient = max(0.5, min(1.0, 1.5 * long_rtt / rtt))   # 1.5: the tolerance
        new = limit * gradient + 4                              # 4: the queue allowance
        limit = limit * 0.8 + new * 0.2                         # smoothing
        limit within [1, adaptive_max]

    So the limit grows by up to 0.8 an answer while latency stays within 1.5 times its recent
    norm, and shrinks (at most halving per step, smoothed) when latency climbs past that under
    load. It does not grow while fewer than half its slots are used (the caller, not the
    upstream, limits the rate then), and when the long average is over twice the sample the
    average is pulled down by 5% (latency back to normal after long overload), as Gradient2
    does. Starts at Gradient2's initial 20 (or adaptive_max if less).
    """

    INITIAL = 20
    _TOLERANCE = 1.5
    _QUEUE = 4.0
    _SMOOTHING = 0.2
    _LONG_WINDOW = 600
    _WARMUP = 10
    _CALLS = 4096  # calls remembered as having lowered the limit (the oldest forgotten first)

    def __init__(self, bulkhead: Bulkhead, maximum: int, on_limit: Callable[[float], None]) -> None:
        self._bulkhead = bulkhead
        self._maximum = maximum
        self._on_limit = on_limit
        self._estimate = float(min(self.INITIAL, maximum))
        self._long_rtt = 0.0
        self._samples = 0
        self._lowered: collections.OrderedDict[str, None] = collections.OrderedDict()
        bulkhead.resize(int(self._estimate))
        on_limit(int(self._estimate))

    def __repr__(self) -> str:
        return (
            f"<GradientLimit [{self._estimate:.1f} of 1..{self._maximum}, "
            f"long rtt {self._long_rtt * 1000:.2f}ms over {self._samples} samples]>"
        )

    @property
    def limit(self) -> int:
        return int(self._estimate)

    def sample(self, rtt: float, inflight: int, call: str | None = None) -> None:
        """One answered attempt of ``call`` that took ``rtt`` seconds with ``inflight``
        attempts out. A limit is shared by every caller: one call lowers it once at most (its
        other samples that would lower it are left out, from the average too), so that one
        caller's wide calls to a slow path cannot shrink it for everyone (issue 23, #14). A sample
        of no ``call`` is a call of its own."""
        rtt = max(rtt, 1e-6)
        samples, long_rtt = self._averaged(rtt)
        estimate = self._estimate
        new = estimate
        if inflight >= estimate / 2:
            gradient = max(0.5, min(1.0, self._TOLERANCE * long_rtt / rtt))
            new = estimate * gradient + self._QUEUE
            new = estimate * (1 - self._SMOOTHING) + new * self._SMOOTHING
            if new < estimate and not self._may_lower(call):
                return
        self._samples, self._long_rtt = samples, long_rtt
        if long_rtt / rtt > 2:
            self._long_rtt *= 0.95
        self._estimate = max(1.0, min(float(self._maximum), new))
        if int(self._estimate) != int(estimate):
            self._bulkhead.resize(int(self._estimate))
            self._on_limit(int(self._estimate))

    def _may_lower(self, call: str | None) -> bool:
        """Whether ``call`` has not lowered the limit yet (and now has)."""
        if call is None:
            return True
        if call in self._lowered:
            return False
        self._lowered[call] = None
        if len(self._lowered) > self._CALLS:
            self._lowered.popitem(last=False)
        return True

    def _averaged(self, rtt: float) -> tuple[int, float]:
        """The sample count and long average with ``rtt`` in them (not yet kept)."""
        if self._samples < self._WARMUP:
            samples = self._samples + 1
            return samples, self._long_rtt + (rtt - self._long_rtt) / samples
        factor = 2.0 / (self._LONG_WINDOW + 1)
        return self._samples, self._long_rtt * (1 - factor) + rtt * factor


def _at(deadline: float | Deadline) -> float:
    return deadline.at if isinstance(deadline, Deadline) else deadline


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; a token is taken per attempt."""

    def __init__(self, upstream: str, rate: float, burst: int) -> None:
        self._upstream = upstream
        self.rate = rate
        self.burst = burst
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

    def try_take(self) -> float:
        """Takes a token when one is there (0.0); else takes none and says in how many
        seconds one will be (a caller's quota refuses at once instead of waiting)."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self._rate

    def _refill(self) -> None:
        now = self._loop.time()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
