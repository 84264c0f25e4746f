"""One Aggregate or Collect call as the server saw it: made by the handler, filled as the call
goes, then read once for the call's log line, its metrics and the admin page's record.

It holds names, counts, timings and the results already sent, never a value the caller sent
(no metadata, no parameter, no body): whatever reads it may show any field it holds.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import grpc

from aggregator.errors import CallFailure
from aggregator.fanout import Budget
from aggregator.plan import Plan
from aggregator.security.auth import Caller
from aggregator.v1 import aggregator_pb2 as pb


@dataclass(slots=True)  # not frozen: filled as the call goes (and a frozen __init__ costs 2x)
class CallRecord:
    request_id: str
    aggregate: str  # the named aggregate, or ad_hoc: only ever a configured name
    requested: int  # targets in the request (for_each may make more results)
    budget: Budget
    caller: Caller | None = None  # who called, once identified (auth on)
    # The plan as requested or configured, before any value was filled in: a named aggregate's
    # paths stay templates ({{params.user}}), so a record never holds a parameter's value.
    plan: Plan | None = None
    # Live views of the fan-out's own collections (nothing copied, nothing made per call).
    reported: Collection[pb.TargetResult] = ()  # sent to the caller
    cut: Collection[pb.TargetResult] = ()  # running when the call was cancelled: never sent
    unsent: Collection[str] = ()  # ids of the targets refused here, before reaching upstream
    failure: CallFailure | None = None  # why the call did not end OK
    elapsed_ns: int = 0  # from the budget's start to the status
    first_at_ns: int | None = None  # perf_counter_ns of the first result
    fanin_ns: int | None = None  # from the first result to the last
    _latencies_ns: tuple[int, ...] | None = field(default=None, init=False, repr=False)
    _outcomes: tuple[int, ...] | None = field(default=None, init=False, repr=False)

    def __repr__(self) -> str:
        return (
            f"<CallRecord {self.request_id} {self.aggregate} {self.code.name} "
            f"[{len(self.reported)}/{self.requested} results, {self.elapsed_ns / 1e6:.3f}ms]>"
        )

    @property
    def code(self) -> grpc.StatusCode:
        return self.failure.code if self.failure is not None else grpc.StatusCode.OK

    @property
    def deadline_ns(self) -> int:
        return int(self.budget.seconds * 1e9)

    @property
    def cutoff_ns(self) -> int:
        """When the server stops waiting, from the start: the budget less its margin."""
        return int((self.budget.seconds - self.budget.margin) * 1e9)

    def results(self) -> Collection[pb.TargetResult]:
        """Every target's result: those sent, then those cut by a cancellation."""
        return (*self.reported, *self.cut) if self.cut else self.reported

    def latencies_ns(self) -> tuple[int, ...]:
        """Each result's latency, in the order of ``results()``, once the call has ended.

        Read from the protobufs once: the overhead metric and the admin record both need
        them, and reading a Duration's two fields is the dearest part of either."""
        if self._latencies_ns is None:
            self._latencies_ns = tuple(
                latency.seconds * 1_000_000_000 + latency.nanos
                for latency in (result.latency for result in self.results())
            )
        return self._latencies_ns

    def outcomes(self) -> tuple[int, ...]:
        """Each result's outcome, in the order of ``results()``, once the call has ended (read
        once for the log line's failed targets and the admin record)."""
        if self._outcomes is None:
            self._outcomes = tuple(result.outcome for result in self.results())
        return self._outcomes
