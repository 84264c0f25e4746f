"""An upstream behind its policies: the one place where retries, hedging, the breaker and the
limits wrap single attempts, the same way for REST and gRPC upstreams.

Every attempt (first, retry or hedge) takes a rate-limit token, asks the breaker, holds a
bulkhead slot, and runs under the smaller of the upstream's ``timeout`` and the time left.

Each attempt goes to the endpoint the upstream's balancer picks (aggregator/upstreams/fleet.py:
one endpoint for a literal address, a Fleet otherwise), a retry or hedge to another than the
target's earlier ones, and the balancer hears how each went (outlier detection); the breaker
counts a failure only when every endpoint taking calls failed its last attempt.
``max_concurrency: auto`` resizes the bulkhead with a GradientLimit fed by each answered
attempt's latency, each call lowering it once at most.

Shared state (the breaker, an endpoint's outlier state, the adaptive limit, the retry budget,
a coalesced call) answers only to what the upstream did, as policies/blame.py decides for every
result: a caller's bad input, a timeout set by the caller's own limit (its target ``timeout``
or the call's deadline) and a timeout that fired while this process's event loop was late are
never counted against the breaker or an endpoint, nor sampled by the adaptive limit. A
caller's timeout is never retried, and a coalesced call runs until the latest of its waiters'
deadlines, each waiter leaving at its own.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import grpc

from aggregator import tracing
from aggregator.config import UpstreamConfig
from aggregator.errors import TargetFailure
from aggregator.metrics import UpstreamMetrics
from aggregator.policies.blame import Blame, Unblamed, blame, failed
from aggregator.policies.breaker import Breaker
from aggregator.policies.budget import RetryBudget
from aggregator.policies.cache import Coalescer, ResponseCache
from aggregator.policies.deadline import Alarm, Deadline
from aggregator.policies.global_limits import SharedLimits, rate_limiter
from aggregator.policies.limits import Bulkhead, GradientLimit
from aggregator.request import GrpcRequest, HttpRequest
from aggregator.timers import SYSTEM_CLOCK, Clock, Timers
from aggregator.upstreams.seam import Balancer, Member, Reply, Upstream
from aggregator.v1 import aggregator_pb2 as pb

Result = Reply | TargetFailure

_RETRY_HTTP_STATUSES = frozenset({429, 502, 503, 504})
_CODES_BY_NAME = {code.name: code.value[0] for code in grpc.StatusCode}
_DEFAULT_BUDGET = (0.2, 3.0)  # for hedges when no retry policy is configured
# A timeout whose timer the event loop ran more than this late is this process's, not the
# upstream's: the answer may have been in, unread (docs/resilience.md).
LATE_TOLERANCE = 0.100
# Answered attempts that never feed the adaptive limit: not the upstream's doing.
_UNSAMPLED = (Blame.CALLER, Blame.OURS)


class _CallerTimeout(Unblamed):
    """A timeout the caller's own limit set, not the upstream's ``timeout``: it says nothing
    of the upstream's health (docs/resilience.md), and no retry could finish within it."""


class _Sent:
    """Attempts of one target that reached the upstream (what TargetResult.attempts counts),
    and the endpoints they went to (a fleet's retries and hedges go elsewhere if they can)."""

    __slots__ = ("count", "tried")

    def __init__(self) -> None:
        self.count = 0
        self.tried: list[Member] = []


@dataclass(slots=True)  # not frozen: a frozen __init__ costs twice as much, once per target
class Answer:
    """The target's last attempt's result, and how many attempts it took."""

    result: Result
    attempts: int
    cache: pb.CacheStatus = pb.CACHE_STATUS_UNSPECIFIED


class GuardedUpstream:
    """An upstream behind its policy stack (the module docstring): what the fan-out calls."""

    def __init__(
        self,
        balancer: Balancer,
        config: UpstreamConfig,
        metrics: UpstreamMetrics,
        all_upstreams: Bulkhead,
        timers: Timers | None = None,
        clock: Clock = SYSTEM_CLOCK,
        shared_limits: SharedLimits | None = None,
    ) -> None:
        self.name = config.name
        self._clock = clock
        self._timers = timers or Timers()
        self.metrics = metrics
        self._balancer = balancer
        self._config = config
        self._loop = asyncio.get_running_loop()
        retry = config.retry
        ratio, floor = (retry.budget, retry.min_retries_per_second) if retry else _DEFAULT_BUDGET
        self.budget = RetryBudget(ratio, floor)
        self._retry_grpc_codes = frozenset(
            _CODES_BY_NAME[name] for name in (retry.grpc_codes if retry else ())
        )
        self.bulkhead = Bulkhead(
            config.name,
            config.max_concurrency,
            f"{config.name} has {config.max_concurrency} calls in flight (max_concurrency) "
            "and none finished in time"
            if not config.adaptive_concurrency
            else f"{config.name} is at its adaptive concurrency limit (max_concurrency: auto) "
            "and no call finished in time",
        )
        self.adaptive = (
            GradientLimit(self.bulkhead, config.adaptive_max, metrics.concurrency_limit.set)
            if config.adaptive_concurrency
            else None
        )
        if self.adaptive is None:
            metrics.concurrency_limit.set(config.max_concurrency)
        self._all_upstreams = all_upstreams
        self.bucket = rate_limiter(config, shared_limits)
        breaker = config.circuit_breaker
        self.breaker = (
            Breaker(
                config.name,
                breaker.fail_max,
                breaker.reset_timeout,
                metrics.circuit_state.set,
                clock,
            )
            if breaker
            else None
        )
        # Moving average of answered attempts (any status: a 503 measures the round trip as
        # well as a 200), to tell whether a retry can finish before the deadline.
        self._latency = 0.0
        self.cache = ResponseCache(config, config.cache, clock) if config.cache else None
        self._single_attempt = config.retry is None and config.hedge is None
        self._own_timeout = config.timeout  # read by every attempt
        self._kind = config.kind
        self.coalescer = Coalescer()

    def __repr__(self) -> str:
        adaptive = f" {self.adaptive!r}" if self.adaptive is not None else ""
        return (
            f"<GuardedUpstream {self.name} {self.bulkhead!r}{adaptive} {self.breaker!r} "
            f"{self.budget!r} {self._balancer!r}>"
        )

    async def call(
        self,
        request: HttpRequest | GrpcRequest,
        *,
        idempotent: bool,
        deadline: float,
        deadline_reason: str,
        request_id: str,
    ) -> Answer:
        """The cache's answer, or the upstream's through every policy by ``deadline``."""
        limit = Deadline(deadline, deadline_reason)
        if self.cache is not None and self.cache.cacheable(request):
            assert isinstance(request, HttpRequest)
            return await self._cached(self.cache, request, idempotent, limit, request_id)
        sent = _Sent()
        if self._single_attempt:  # the common case, without the retry machinery
            result = await self._attempt(request, limit, request_id, sent)
            return Answer(result, sent.count)
        return await self._attempts(request, idempotent, limit, request_id, sent)

    async def _cached(
        self,
        cache: ResponseCache,
        request: HttpRequest,
        idempotent: bool,
        limit: Deadline,
        request_id: str,
    ) -> Answer:
        # What goes upstream besides the request: our trace context, whose tracestate the
        # caller chose (its traceparent is our attempt's own, made per attempt: not keyed).
        key = cache.key(request, tracing.outgoing())
        entry = await cache.get(key)
        if entry is not None and entry.fresh(self._clock.time()):
            self.metrics.cache["hit"].inc()
            return Answer(entry.reply, 0, pb.CACHE_STATUS_HIT)
        sent = _Sent()

        async def fetch(shared: Deadline) -> Answer:
            answer = await self._attempts(request, idempotent, shared, request_id, sent)
            if isinstance(answer.result, Reply) and answer.result.ok:
                await cache.store(key, answer.result)
            return answer

        try:
            answer, joined = await self.coalescer.run(key, limit, fetch)
            if joined:  # this caller made no attempt of its own
                answer = Answer(answer.result, 0)
        except TimeoutError:  # this caller's own limit; the shared call goes on for others
            answer = Answer(self._caller_timeout(limit.reason), sent.count)
        if (
            _is_good(answer.result)
            or entry is None
            or not cache.stale_usable(entry, self._clock.time())
        ):
            self.metrics.cache["miss"].inc()
            return Answer(answer.result, answer.attempts, pb.CACHE_STATUS_MISS)
        self.metrics.cache["stale"].inc()
        return Answer(entry.reply, answer.attempts, pb.CACHE_STATUS_STALE)

    async def _attempts(
        self,
        request: HttpRequest | GrpcRequest,
        idempotent: bool,
        limit: Deadline,
        request_id: str,
        sent: _Sent,
    ) -> Answer:
        """Attempts, retries and hedges within ``limit``."""
        self.budget.record_request()
        max_attempts = self._max_attempts()
        tried = 0  # attempts made, sent or not (rejected, circuit open)
        while True:
            result, made = await self._round(
                request, idempotent, max_attempts - tried, limit, request_id, sent
            )
            tried += made
            if tried >= max_attempts or not self._retryable(request, idempotent, result):
                return Answer(result, sent.count)
            delay = self._retry_delay(tried, result, limit.at)
            if delay is None or not self.budget.try_withdraw():
                return Answer(result, sent.count)
            await asyncio.sleep(delay)

    def _max_attempts(self) -> int:
        if self._config.retry:
            return self._config.retry.attempts
        return 2 if self._config.hedge else 1

    async def _round(
        self,
        request: HttpRequest | GrpcRequest,
        idempotent: bool,
        room: int,
        limit: Deadline,
        request_id: str,
        sent: _Sent,
    ) -> tuple[Result, int]:
        if self._config.hedge is None or not idempotent or room < 2:
            return await self._attempt(request, limit, request_id, sent), 1
        delay = self._config.hedge.delay
        return await self._hedged(request, delay, limit, request_id, sent)

    async def _hedged(
        self,
        request: HttpRequest | GrpcRequest,
        delay: float,
        limit: Deadline,
        request_id: str,
        sent: _Sent,
    ) -> tuple[Result, int]:
        """Sends a second attempt if the first has not answered after ``delay``; the first
        good (or final) answer wins and the other attempt is cancelled."""
        tasks = {asyncio.create_task(self._attempt(request, limit, request_id, sent))}
        made = 1
        try:
            done, _ = await asyncio.wait(tasks, timeout=delay)
            if not done and self._loop.time() < limit.at and self.budget.try_withdraw():
                hedge = self._attempt(request, limit, request_id, sent, "hedge")
                tasks.add(asyncio.create_task(hedge))
                made = 2
            last: Result | None = None
            while tasks:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    last = task.result()
                    if not self._retryable(request, True, last):
                        return last, made
            assert last is not None
            return last, made
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)

    async def _attempt(
        self,
        request: HttpRequest | GrpcRequest,
        limit: Deadline,
        request_id: str,
        sent: _Sent,
        kind: str = "",
    ) -> Result:
        """One attempt through every policy; failures are returned, cancellation raised."""
        try:
            if self.bucket is not None:
                await self.bucket.take(limit.at)
            trial = self.breaker.admit() if self.breaker is not None else False
        except TargetFailure as failure:
            return failure
        result: Result | None = None
        reached = ""
        try:
            if not self._take_slots():
                await self._hold_slots(limit)
            try:
                sent.count += 1
                reached = kind or ("retry" if sent.count > 1 else "first")
                result = await self._on_endpoint(request, limit, request_id, sent)
            finally:
                self._all_upstreams.release()
                self.bulkhead.release()
        except TargetFailure as failure:
            result = failure
        finally:
            if reached:  # counted against the upstream only when it reached it
                self.metrics.attempted(reached, result)
            if self.breaker is not None:
                self.breaker.record(trial, self._breaker_verdict(result))
        return result

    def _breaker_verdict(self, result: Result | None) -> bool | None:
        """What the breaker counts: with several endpoints, a failure only when every endpoint
        taking calls failed its last attempt (one bad endpoint is outlier detection's)."""
        verdict = None if result is None else failed(blame(result))
        if verdict and not self._balancer.all_failing():
            return None
        return verdict

    async def _on_endpoint(
        self,
        request: HttpRequest | GrpcRequest,
        limit: Deadline,
        request_id: str,
        sent: _Sent,
    ) -> Reply:
        """The attempt on the endpoint the balancer picks, another than the target's earlier
        attempts when there is one; a connect refused (nothing sent) moves on to an untried
        endpoint at once. Each endpoint hears how its attempt went (outlier detection)."""
        tried = sent.tried
        fleet = self._balancer
        while True:
            member = fleet.ready(tried) or await fleet.choose(tried, limit.at)
            tried.append(member)
            verdict: bool | None = None
            try:
                reply = await self._timed(member.upstream, request, limit, request_id)
                verdict = failed(blame(reply))
                return reply
            except TargetFailure as failure:
                verdict = failed(blame(failure))
                if not failure.unsent or not fleet.untried(tried):
                    raise
            finally:
                fleet.done(member, verdict)

    def _take_slots(self) -> bool:
        """Both slots at once if both are free: the common case, without awaiting."""
        if self.bulkhead.try_acquire():
            if self._all_upstreams.try_acquire():
                return True
            self.bulkhead.release()
        return False

    async def _hold_slots(self, limit: Deadline) -> None:
        """A slot of this upstream's bulkhead, then one of the cap on all upstreams, waiting
        for them until ``limit``."""
        await self.bulkhead.acquire(limit)
        try:
            await self._all_upstreams.acquire(limit)
        except BaseException:
            self.bulkhead.release()
            raise

    async def _timed(
        self,
        upstream: Upstream,
        request: HttpRequest | GrpcRequest,
        limit: Deadline,
        request_id: str,
    ) -> Reply:
        """One call under the smaller of the upstream's timeout and the time left."""
        loop = self._loop
        started = loop.time()  # schedules the timeout; the duration is measured on perf_counter
        began = time.perf_counter_ns()
        own_timeout = self._own_timeout
        # What a gRPC upstream gets as its deadline. A coalesced call's limit may move later
        # while the call runs, but only HTTP calls are coalesced (ResponseCache.cacheable).
        timeout = max(min(own_timeout, limit.at - started), 0.0)
        task = asyncio.current_task()
        assert task is not None
        with tracing.attempt_span(self.name, self._kind) as span:
            # asyncio.timeout_at's protocol on a shared timer (aggregator/timers.py): cancel
            # this task when the time is up; once it fired, take that cancel back on every way
            # out, and turn the cancellation into a timeout only if nobody else cancelled too.
            cancelling = task.cancelling()
            alarm = Alarm(self._timers, task, started + own_timeout, limit)
            try:
                expired = False
                try:
                    if span is not None:  # tracing on: the attempt's traceparent goes along
                        request = _traced(request)
                    reply = await upstream.call(request, timeout, request_id)
                finally:
                    alarm.cancel()
                    expired = alarm.rang and task.uncancel() <= cancelling
            except (asyncio.CancelledError, TimeoutError) as exc:
                if isinstance(exc, asyncio.CancelledError) and not expired:
                    raise  # the caller's cancellation (or someone's besides ours)
                failure = self._timeout(alarm, limit.reason)
                _annotate_failure(span, failure)
                if self.adaptive is not None and blame(failure) is Blame.UPSTREAM:
                    self.adaptive.sample(own_timeout, self.bulkhead.inflight, request_id)
                raise failure from None
            except TargetFailure as failure:
                _annotate_failure(span, failure)
                if failure.outcome == pb.OUTCOME_TIMEOUT and timeout < own_timeout:
                    # The deadline a gRPC upstream got was the caller's, not its own.
                    grpc_code = failure.grpc_code
                    raise _CallerTimeout(
                        failure.outcome, failure.sentence, grpc_code=grpc_code
                    ) from failure
                raise
            finally:
                took = (time.perf_counter_ns() - began) / 1e9
                self.metrics.request_duration.observe(took)
            if span is not None:
                tracing.annotate(span, _reply_attributes(reply))
        self._latency = 0.8 * self._latency + 0.2 * took
        if self.adaptive is not None and blame(reply) not in _UNSAMPLED:
            self.adaptive.sample(took, self.bulkhead.inflight, request_id)
        return reply

    def _timeout(self, alarm: Alarm, reason: str) -> TargetFailure:
        """OUTCOME_TIMEOUT, naming the limit that fired: the caller's or the upstream's own;
        the latter is not the upstream's when the loop ran the alarm late (a stall here)."""
        if alarm.by_caller:
            return self._caller_timeout(reason)
        own = f"upstream timeout {self._config.timeout * 1000:g}ms"
        if alarm.late > LATE_TOLERANCE:
            return Unblamed(
                pb.OUTCOME_TIMEOUT,
                f"{self.name} did not answer within {own} (this server was "
                f"{alarm.late * 1000:.0f}ms late to read it: not held against {self.name})",
            )
        return TargetFailure(pb.OUTCOME_TIMEOUT, f"{self.name} did not answer within {own}")

    def _caller_timeout(self, reason: str) -> _CallerTimeout:
        return _CallerTimeout(pb.OUTCOME_TIMEOUT, f"{self.name} did not answer within {reason}")

    def _retryable(
        self, request: HttpRequest | GrpcRequest, idempotent: bool, result: Result
    ) -> bool:
        if isinstance(result, _CallerTimeout):
            return False  # the caller's time is up: no retry can finish within it
        if isinstance(request, GrpcRequest):
            code = result.grpc_code
            return code in self._retry_grpc_codes
        if not idempotent:
            return False
        if isinstance(result, TargetFailure):
            return result.outcome == pb.OUTCOME_UNAVAILABLE
        return result.http_status in _RETRY_HTTP_STATUSES

    def _retry_delay(self, attempts: int, result: Result, deadline: float) -> float | None:
        """Full-jitter exponential back-off (or Retry-After); None when it cannot finish in time."""
        retry = self._config.retry
        backoff, cap = (retry.backoff, retry.max_backoff) if retry else (0.025, 0.25)
        delay = random.uniform(0, min(cap, backoff * 2 ** (attempts - 1)))
        if result.retry_after is not None:  # Retry-After, or a gRPC RetryInfo
            delay = max(delay, result.retry_after)
        if self._loop.time() + delay + self._latency >= deadline:
            return None
        return delay

    def admin_stats(self) -> dict[str, Any]:
        """What the admin page shows of this upstream's policies (docs/admin.md): its endpoints
        (docs/fleet.md: one, or a fleet's active and ejected ones) and its concurrency limit (fixed,
        or where the adaptive limit stands)."""
        active, ejected = self._balancer.counts()
        endpoints = {"active": active, "ejected": ejected}
        return {
            "kind": self._config.kind,
            "endpoints": endpoints,
            "breaker": self.breaker.state if self.breaker is not None else "none",
            "in_flight": self.bulkhead.inflight,
            "concurrency_limit": self.bulkhead.limit,
        }

    async def aclose(self) -> None:
        await self._balancer.aclose()
        if self.cache is not None:
            await self.cache.aclose()


def _traced(request: HttpRequest | GrpcRequest) -> HttpRequest | GrpcRequest:
    """The request carrying the current attempt span's traceparent, when tracing is on."""
    trace_headers = tracing.outgoing()
    if not trace_headers:
        return request
    if isinstance(request, HttpRequest):
        return replace(request, headers=(*request.headers, *trace_headers))
    return replace(request, metadata=(*request.metadata, *trace_headers))


def _annotate_failure(span: Any, failure: TargetFailure) -> None:
    if span is not None:
        tracing.annotate(span, {"aggregator.outcome": pb.Outcome.Name(failure.outcome)})


def _reply_attributes(reply: Reply) -> dict[str, int | str]:
    if reply.http_status:
        return {"http.response.status_code": reply.http_status}
    return {"rpc.grpc.status_code": reply.grpc_code}


def _is_good(result: Result) -> bool:
    """An answer worth returning over a stale entry: 2xx, or a client error (not 429)."""
    if not isinstance(result, Reply):
        return False
    return result.ok or (400 <= result.http_status < 500 and result.http_status != 429)
