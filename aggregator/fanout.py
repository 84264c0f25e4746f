"""Runs a Plan: every target that can start starts at once; results leave in completion order.

An ``Aggregation`` owns one task per target. Its ``run(emit)`` hands each TargetResult to
``emit`` (the stream's ``context.write``) as it completes and, whatever ends it (all done, the
budget ran out, a required target failed, the caller went away), cancels and awaits every task
it started before it returns.

Times are measured with ``time.perf_counter_ns()`` and reported as integer nanoseconds
(docs/api.md): the loop's clock only schedules (deadlines, timers), since uvloop's counts whole
milliseconds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import grpc

from aggregator.config import ServerConfig
from aggregator.decoding import CallDecoder, NotDecoded
from aggregator.errors import CallFailure, TargetFailure, quota_failure, retry_info
from aggregator.grpc_json import rendered_request
from aggregator.outcomes import outcome_name
from aggregator.plan import Plan, PlannedTarget
from aggregator.policies.endpoint import GuardedUpstream
from aggregator.request import GrpcRequest, HttpRequest
from aggregator.results import answered, failed, timed_result, with_fallback
from aggregator.security.outbound import target_problems
from aggregator.status import status_for
from aggregator.substitution import Substitution, resolve
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import ITEM

log = logging.getLogger("aggregator")
Emit = Callable[[pb.TargetResult], Awaitable[None]]
_OK = pb.OUTCOME_OK
_CANCELLED = pb.OUTCOME_CANCELLED
# Put on the queue when the number of results to expect changed (a for_each expanded).
_RECOUNT = pb.TargetResult()
# Put on the queue by a timer when the budget runs out: one timer per aggregate, rather than
# a timeout around every wait for a result.
_DEADLINE = pb.TargetResult()


class Budget:
    """The time an aggregate may take, in event-loop time, and when it started on the
    measuring clock. Read-only once made (a plain class: a frozen dataclass's __init__ cost
    4.8 µs of every call, measured)."""

    __slots__ = ("seconds", "started", "started_ns", "stop_at")

    def __init__(
        self, seconds: float, started: float, stop_at: float, started_ns: int | None = None
    ) -> None:
        self.seconds = seconds  # the budget applied (docs/api.md): x-aggregate-deadline-ms
        self.started = started
        self.stop_at = stop_at  # when the server stops waiting: budget minus the margin
        # time.perf_counter_ns() at the start: the origin of every start_offset and of elapsed.
        self.started_ns = time.perf_counter_ns() if started_ns is None else started_ns

    @classmethod
    def for_call(cls, time_remaining: float | None, server: ServerConfig, now: float) -> Budget:
        if time_remaining is None:
            seconds = server.default_deadline
        else:
            seconds = max(0.0, min(time_remaining, server.max_deadline))
        margin = max(server.deadline_margin, server.deadline_margin_ratio * seconds)
        return cls(seconds, now, now + max(0.0, seconds - margin))

    def __repr__(self) -> str:
        return f"<Budget {self.seconds * 1000:.0f}ms>"

    @property
    def margin(self) -> float:
        """Seconds between when the server stops waiting and the end of the budget."""
        return self.seconds - (self.stop_at - self.started)

    def words(self) -> str:
        """``budget 30 ms less a 20 ms margin``: why a 30 ms call stops waiting at 10 ms."""
        return f"budget {_about_ms(self.seconds)} less a {_about_ms(self.margin)} margin"


class _Inbox:
    """Results in the order they settle, for one reader (Aggregation.run).

    asyncio.Queue does this plus maxsize, join and task_done bookkeeping that one reader never
    uses, at several times the cost per result (measured: 8.5K instructions to make one and
    6.4K per item, against about 1K each here).
    """

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[pb.TargetResult] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: pb.TargetResult) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __bool__(self) -> bool:
        return bool(self._items)

    def pop(self) -> pb.TargetResult:
        """The next item; only when there is one (``bool(inbox)``)."""
        return self._items.popleft()

    async def wait(self) -> None:
        """Returns once there is an item (at once if there is one)."""
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class Aggregation:
    """One Aggregate call in flight."""

    def __init__(
        self,
        plan: Plan,
        endpoints: Mapping[str, GuardedUpstream],
        budget: Budget,
        request_id: str,
        decoder: CallDecoder,
    ) -> None:
        self._plan = plan
        self._decoder = decoder
        self._endpoints = endpoints
        self._budget = budget
        self._request_id = request_id
        self._loop = asyncio.get_running_loop()
        self._queue = _Inbox(self._loop)
        self._settled: dict[str, pb.TargetResult] = {}
        self._by_id = {target.id: target for target in plan.targets}
        # Set when a target settles; only targets that others depend on need one.
        self._finished = {
            dep: asyncio.Event() for target in plan.targets for dep in target.depends_on
        }
        self._skipped_by: dict[str, str] = {}  # dependent id -> the dependency that failed
        # Targets that ended before their request reached the upstream (refused here): what
        # they say is not the upstream's doing (its metrics and the admin page leave them out).
        self.unsent: set[str] = set()
        self._expanded: set[str] = set()  # for_each targets whose elements report instead
        self._expected = len(plan.targets)  # results to report; for_each changes it
        self._tasks: list[asyncio.Task[None]] = []
        self._deadline_reason = f"the call's deadline ({budget.words()})"
        self.reported: dict[str, pb.TargetResult] = {}
        self.failure: CallFailure | None = None
        self._began: dict[str, int] = {}  # target id -> when its call began (perf_counter_ns)
        self.first_at: int | None = None  # when the first result was emitted (perf_counter_ns)
        # When the call itself is cancelled: the targets it never reported, as they stood.
        self.left_unreported: list[pb.TargetResult] = []
        self._timer: asyncio.TimerHandle | None = None  # stop waiting, then cut (run)
        self._cut = False  # the budget's end came while results were still being written

    def __repr__(self) -> str:
        running = sum(not task.done() for task in self._tasks)
        return (
            f"<Aggregation {self._request_id} [{len(self.reported)}/{self._expected} "
            f"reported, {running} running] {self._budget!r}>"
        )

    async def run(self, emit: Emit) -> None:
        """Emits one result per target as each completes; stops early (setting ``failure``)
        on a required failure. Every task it started is cancelled and awaited on the way out.

        At the budget less its margin it stops waiting and reports what is left; at the end of
        the budget itself, if writing the results still waits (a caller that does not read its
        stream holds up grpc's flow control), the call is cut: CallFailure DEADLINE_EXCEEDED,
        RESULTS_NOT_READ. One loop timer does both, re-armed for the cut: this is
        asyncio.timeout_at's protocol (cancel the task, take that cancel back on the way out)
        without a second timer per call (measured: 9 µs of a call for asyncio.timeout_at)."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks = [
            asyncio.create_task(self._run(target), name=f"target {target.id}")
            for target in self._plan.targets
        ]
        cancelling = task.cancelling()
        self._timer = self._loop.call_at(self._budget.stop_at, self._stop_waiting, task)
        try:
            queue = self._queue
            while len(self.reported) < self._expected:
                if not queue:  # no coroutine per result when one is waiting already
                    await queue.wait()
                result = self._next(queue.pop())
                if result is _RECOUNT:
                    continue
                if result is None:  # the budget ran out: stop the calls, then report them
                    sentence = f"{self._deadline_reason} ran out first"
                    await self._stop(emit, pb.OUTCOME_TIMEOUT, sentence)
                    return
                self._report(result)
                self.first_at = self.first_at or time.perf_counter_ns()
                await emit(result)
                if self.failure is not None:
                    sentence = f"cancelled because required target {result.id!r} failed"
                    await self._stop(emit, pb.OUTCOME_CANCELLED, sentence)
                    return
        except asyncio.CancelledError:  # the caller went away, or the server's grace ran out
            stopped_at = time.perf_counter_ns()
            self.left_unreported.extend(
                self._settled.get(target.id)
                or self._stopped(target.id, _CANCELLED, "cancelled", stopped_at)
                for target in list(self._by_id.values())
                if target.id not in self.reported and target.id not in self._expanded
            )
            if self._cut and task.uncancel() <= cancelling:  # our cut, nobody else's cancel
                raise _unread(self._budget) from None
            raise
        finally:
            self._timer.cancel()
            await self._cancel_all()

    def _stop_waiting(self, task: asyncio.Task[Any]) -> None:
        """The budget less its margin is over: report what is left; cut at the budget's end."""
        self._queue.put(_DEADLINE)
        end = self._budget.started + self._budget.seconds
        self._timer = self._loop.call_at(end, self._cut_call, task)

    def _cut_call(self, task: asyncio.Task[Any]) -> None:
        self._cut = True
        task.cancel()

    async def _stop(self, emit: Emit, outcome: pb.Outcome, sentence: str) -> None:
        """Cancels every target still running, then reports each unreported one as ``outcome``."""
        stopped_at = time.perf_counter_ns()
        await self._cancel_all()
        for result in self._unreported(outcome, sentence, stopped_at):
            await emit(result)

    def _next(self, result: pb.TargetResult) -> pb.TargetResult | None:
        if result is _DEADLINE:
            return None
        if result is _RECOUNT:
            return result
        if self._by_id[result.id].required and result.outcome != pb.OUTCOME_OK:
            self.failure = self._required_failure(result)
        return result

    def _unreported(
        self, outcome: pb.Outcome, sentence: str, stopped_at: int
    ) -> list[pb.TargetResult]:
        """Results for the targets still unreported when the call stopped at ``stopped_at``
        (perf_counter_ns): one that was running keeps its start, its latency is how long it ran
        until then."""
        results = []
        for target in list(self._by_id.values()):
            if target.id not in self.reported and target.id not in self._expanded:
                result = self._settled.get(target.id) or self._stopped(
                    target.id, outcome, sentence, stopped_at
                )
                if outcome == pb.OUTCOME_TIMEOUT:
                    result = with_fallback(target, result)
                    if target.required and result.outcome != pb.OUTCOME_OK:
                        self.failure = self.failure or self._required_failure(result)
                self._report(result)
                results.append(result)
        return results

    def _stopped(
        self, target_id: str, outcome: pb.Outcome, sentence: str, stopped_at: int
    ) -> pb.TargetResult:
        """The result of a target stopped at ``stopped_at``: from its start if it had started."""
        began = self._began.get(target_id, stopped_at)
        return timed_result(
            target_id, outcome, sentence, self._budget.started_ns, began, stopped_at
        )

    def _report(self, result: pb.TargetResult) -> None:
        # Each field read once: a read of a protobuf's field costs what a dict look-up does
        # several times over.
        target_id, outcome = result.id, result.outcome
        self.reported[target_id] = result
        metrics = self._endpoints[self._by_id[target_id].upstream.name].metrics
        if target_id in self.unsent and outcome != pb.OUTCOME_SKIPPED:
            metrics.unsent(outcome)
        else:
            metrics.targets[outcome].inc()

    async def _cancel_all(self) -> None:
        # for_each tasks own their element tasks: cancelling them cancels those too.
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    def _required_failure(self, result: pb.TargetResult) -> CallFailure:
        cause = result
        while cause.outcome == pb.OUTCOME_SKIPPED and cause.id in self._skipped_by:
            cause = self._settled[self._skipped_by[cause.id]]
        message = f"required target {result.id!r} failed: {result.error}"
        if cause is not result:
            message += f" (dependency {cause.id!r}: {cause.error})"
        return _failure_of(cause, self._by_id[cause.id], message, cause.id in self.unsent)

    async def _run(self, target: PlannedTarget) -> None:
        try:
            settled = await self._settle(target)
        except Exception:  # a bug: answer for this target now rather than at the deadline
            log.exception("target %r failed unexpectedly", target.id)
            self.unsent.add(target.id)
            now = time.perf_counter_ns()
            began = self._began.get(target.id, now)
            settled = timed_result(
                target.id, pb.OUTCOME_ERROR, "internal error", self._budget.started_ns, began, now
            )
        if settled is None:  # a for_each target: its elements reported for it
            return
        result = with_fallback(target, settled) if target.fallback is not None else settled
        self._settled[target.id] = result
        if target.id in self._finished:
            self._finished[target.id].set()
        self._queue.put(result)

    async def _settle(self, target: PlannedTarget) -> pb.TargetResult | None:
        blocker = await self._wait_for_dependencies(target) if target.depends_on else None
        started = self._loop.time()  # for the deadline; measured on perf_counter_ns
        began = self._began[target.id] = time.perf_counter_ns()
        origin = self._budget.started_ns
        try:
            if blocker is not None:
                self._skipped_by[target.id] = blocker
                raise TargetFailure(pb.OUTCOME_SKIPPED, f"dependency {blocker!r} did not succeed")
            if target.for_each is not None and target.index is None:
                await self._expand(target, self._elements(target))
                return None
            deadline, reason = self._deadline_for(target, started)
            request = self._request(target)
            if isinstance(request, GrpcRequest) and request.json_body is not None:
                request = await self._encoded(target, request)
            answer = await self._endpoints[target.upstream.name].call(
                request,
                idempotent=target.idempotent,
                deadline=deadline,
                deadline_reason=reason,
                request_id=self._request_id,
            )
        except TargetFailure as failure:  # before (or instead of) the upstream's call
            self.unsent.add(target.id)
            return failed(target.id, failure, 0, origin, began, time.perf_counter_ns())
        if isinstance(answer.result, TargetFailure):
            return failed(
                target.id,
                answer.result,
                answer.attempts,
                origin,
                began,
                time.perf_counter_ns(),
            )
        result = answered(target, answer.result, origin, began, time.perf_counter_ns())
        result.attempts = answer.attempts
        if answer.cache:
            result.cache = answer.cache
        if target.decode_json or target.id in self._finished:  # else nobody reads it as JSON
            await self._decode(target, result)
        return result

    async def _decode(self, target: PlannedTarget, result: pb.TargetResult) -> None:
        """Decodes the body once, for decode_json (``result.json``) and for the targets that
        read it; a refusal is said in ``error`` and leaves the outcome as the upstream made it.
        A gRPC answer is decoded in its JSON mapping when its method is known (and OK)."""
        ok = result.outcome == _OK
        read = ok and target.id in self._finished
        request = target.request
        schema = request.schema if isinstance(request, GrpcRequest) else None
        if not result.body or not (target.decode_json or read) or (schema and not ok):
            return
        into = result.json if target.decode_json else None
        try:
            await self._decoder.decode(result, schema, into, keep=read)
        except NotDecoded as refused:
            result.ClearField("json")
            self._decoder.tell(result, refused)

    def _elements(self, target: PlannedTarget) -> list[Any]:
        assert target.for_each is not None
        elements = resolve(target.for_each, self._values(target))
        if not isinstance(elements, list):
            raise TargetFailure(pb.OUTCOME_ERROR, f"for_each: {target.for_each} is not an array")
        total = self._expected - 1 + len(elements)
        if total > self._plan.max_targets:
            raise TargetFailure(
                pb.OUTCOME_ERROR,
                f"for_each: {len(elements)} elements would make {total} results, "
                f"over server.max_targets ({self._plan.max_targets})",
            )
        return elements

    async def _expand(self, target: PlannedTarget, elements: list[Any]) -> None:
        """Runs one call per element, as targets ``id[0]``, ``id[1]``, ... and waits for them."""
        children = [
            replace(target, id=f"{target.id}[{index}]", index=index, item=element)
            for index, element in enumerate(elements)
        ]
        for child in children:
            self._by_id[child.id] = child
        self._expanded.add(target.id)
        self._expected += len(children) - 1
        self._queue.put(_RECOUNT)
        tasks = [
            asyncio.create_task(self._run(child), name=f"target {child.id}") for child in children
        ]
        try:
            if tasks:
                await asyncio.wait(tasks)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
        # What dependents see: OK when every element is, else the first element that is not.
        failed = (self._settled[c.id] for c in children if self._settled[c.id].outcome != _OK)
        self._settled[target.id] = next(failed, pb.TargetResult(id=target.id, outcome=_OK))
        if target.id in self._finished:
            self._finished[target.id].set()

    def _request(self, target: PlannedTarget) -> HttpRequest | GrpcRequest:
        request = target.request
        if isinstance(request, GrpcRequest) and request.unavailable:
            raise TargetFailure(pb.OUTCOME_UNAVAILABLE, request.unavailable)
        if not target.templated:
            return request
        try:
            rendered = request.rendered(
                Substitution(target.sources, self._values(target)),
                target.upstream,
                self._plan.max_path_bytes,
            )
        except RecursionError:  # a value from a dependency nested too deeply to write as JSON
            raise TargetFailure(
                pb.OUTCOME_ERROR, "a substituted value is JSON nested too deeply to send"
            ) from None
        return self._checked(target, rendered)

    def _checked(
        self, target: PlannedTarget, rendered: HttpRequest | GrpcRequest
    ) -> HttpRequest | GrpcRequest:
        # Substituted values may lengthen the request or leave the allowed paths: check again.
        problems = target_problems(target.upstream, rendered, target.id, self._plan.max_path_bytes)
        if problems:
            raise TargetFailure(pb.OUTCOME_ERROR, "; ".join(map(str, problems)))
        return rendered

    async def _encoded(self, target: PlannedTarget, request: GrpcRequest) -> GrpcRequest:
        """A gRPC JSON request left to encode when its target starts (it held references)."""
        # The substituted values come from the dependencies' answers: they bound its size.
        size = request.json_size + sum(len(self._settled[d].body) for d in target.depends_on)
        rendered = await rendered_request(request, size, self._decoder.offload)
        encoded = self._checked(target, rendered)
        assert isinstance(encoded, GrpcRequest)
        return encoded

    def _values(self, target: PlannedTarget) -> Callable[[str], Any]:
        """What a target's references read: dependencies' JSON bodies, and its element."""

        def value_of(source: str) -> Any:
            return target.item if source == ITEM else self._body(source)

        return value_of

    def _body(self, dep: str) -> Any:
        try:
            return self._decoder.document(self._settled[dep])
        except NotDecoded as refused:
            raise TargetFailure(
                pb.OUTCOME_ERROR, f"dependency {dep!r} {refused.for_dependents}"
            ) from None

    async def _wait_for_dependencies(self, target: PlannedTarget) -> str | None:
        """Waits for every dependency; returns the first that did not end OK, if any."""
        for dep in target.depends_on:
            await self._finished[dep].wait()
        for dep in target.depends_on:
            if self._settled[dep].outcome != pb.OUTCOME_OK:
                return dep
        return None

    def _deadline_for(self, target: PlannedTarget, started: float) -> tuple[float, str]:
        """When the target must be done: the call's deadline, or the target's own timeout if
        sooner; and the words for it in a TIMEOUT result."""
        if target.timeout is not None and started + target.timeout < self._budget.stop_at:
            return started + target.timeout, f"target timeout {_ms(target.timeout)}"
        return self._budget.stop_at, self._deadline_reason


def _unread(budget: Budget) -> CallFailure:
    return CallFailure(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the caller did not read its results within the call's budget "
        f"({budget.seconds * 1000:.0f}ms)",
        reason="RESULTS_NOT_READ",
    )


def _failure_of(
    cause: pb.TargetResult, target: PlannedTarget, message: str, unsent: bool
) -> CallFailure:
    """The call's failure when required target ``cause`` failed: its status (status.py) and
    an ErrorInfo naming the target and upstream; a limit's QuotaFailure, and a RetryInfo where
    waiting helps (a rate limit's next token, an open breaker's reset)."""
    upstream = target.upstream
    metadata = {
        "target": cause.id,
        "upstream": upstream.name,
        "outcome": outcome_name(cause.outcome),
    }
    if cause.http_status:
        metadata["http_status"] = str(cause.http_status)
    elif cause.grpc_code:
        metadata["grpc_code"] = str(cause.grpc_code)
    details = []
    reason = "TARGET_NOT_SENT" if unsent else "UPSTREAM_FAILED"
    if cause.outcome == pb.OUTCOME_REJECTED:
        reason = "UPSTREAM_LIMITED"
        details.append(quota_failure(f"upstreams.{upstream.name}", cause.error))
        if upstream.rate_limit is not None:
            details.append(retry_info(1 / upstream.rate_limit.rate))
    elif cause.outcome == pb.OUTCOME_CIRCUIT_OPEN and upstream.circuit_breaker is not None:
        details.append(retry_info(upstream.circuit_breaker.reset_timeout))
    code = status_for(cause)
    return CallFailure(code, message, reason=reason, metadata=metadata, details=details)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g}ms"


def _about_ms(seconds: float) -> str:
    """A measured span in words: ``498ms`` (``4.9ms`` when short), not ``498.296ms``."""
    millis = seconds * 1000
    return f"{millis:.0f}ms" if millis >= 10 else f"{millis:.1f}ms"
