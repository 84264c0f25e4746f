"""The last ``server.admin_recent`` aggregates, as compact records, and each upstream's last
minute (docs/admin.md).

A record keeps what the waterfall draws and nothing a caller sent as data: no body, no header
or metadata value, no query string, no token. A target's path is its planned path, before any
``{{...}}`` was rendered (a rendered path would hold values from other targets' bodies).
Recording runs after the call's status has gone (``AggregatorService._observe``), from the
call's ``CallRecord``. Every text a record keeps is cut to ``MAX_TEXT`` characters.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Final

from aggregator.admin.rolling import RollingStats
from aggregator.call_record import CallRecord
from aggregator.outcomes import CODE_NAMES, SAYS_NOTHING_OF_UPSTREAM, cache_name, outcome_name
from aggregator.plan import PlannedTarget
from aggregator.request import HttpRequest
from aggregator.v1 import aggregator_pb2 as pb

# Targets kept over all aggregates: wide for_each aggregates hold the ring to ~15 MB (about
# 300 bytes a target) by keeping fewer of them.
MAX_KEPT_TARGETS = 50_000
# Characters kept of any text in a record (ids, names, methods, paths, errors): what makes a
# target's record bounded, whatever a caller or an upstream made that text.
MAX_TEXT = 300


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much
class TargetRecord:
    id: str
    upstream: str
    method: str  # the HTTP method, or the gRPC method's full name
    path: str  # HTTP only, without its query string
    outcome: int
    status: int | str | None  # the HTTP status, the gRPC code's name, or None (no answer)
    error: str
    start_ns: int
    latency_ns: int
    attempts: int
    cache: int
    from_fallback: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "upstream": self.upstream,
            "method": self.method,
            "path": self.path,
            "outcome": outcome_name(self.outcome),
            "status": self.status,
            "error": self.error,
            "start_offset_ms": self.start_ns / 1e6,
            "latency_ms": self.latency_ns / 1e6,
            "attempts": self.attempts,
            "cache": cache_name(self.cache),
            "from_fallback": self.from_fallback,
        }


# A target as a record keeps it: TargetRecord's fields, in its order, as a plain tuple (made
# per target of every call, while a TargetRecord is made only when a page reads it).
Row = tuple[str, str, str, str, int, "int | str | None", str, int, int, int, int, bool]
_ID: Final = 0
_OUTCOME: Final = 4
_FROM_FALLBACK: Final = 11


@dataclass(slots=True)
class AggregateRecord:
    seq: int
    request_id: str
    aggregate: str  # the named aggregate, or "ad_hoc"
    status: str  # the call's gRPC code name
    ended_at: float  # wall clock, seconds since the epoch
    elapsed_ns: int
    deadline_ns: int  # the call's budget, from its start
    cutoff_ns: int  # when the server stopped waiting: the budget less its margin
    requested: int  # targets in the request (for_each may make more results)
    rows: tuple[Row, ...]

    @property
    def targets(self) -> tuple[TargetRecord, ...]:
        return tuple(TargetRecord(*row) for row in self.rows)

    @property
    def failed(self) -> list[str]:
        return [
            row[_ID] for row in self.rows if row[_OUTCOME] != pb.OUTCOME_OK or row[_FROM_FALLBACK]
        ]

    def summary(self) -> dict[str, Any]:
        failed = self.failed
        return {
            "seq": self.seq,
            "request_id": self.request_id,
            "aggregate": self.aggregate,
            "status": self.status,
            "ended_at": self.ended_at,
            "elapsed_ms": self.elapsed_ns / 1e6,
            "deadline_ms": self.deadline_ns / 1e6,
            "cutoff_ms": self.cutoff_ns / 1e6,
            "requested": self.requested,
            "targets": len(self.rows),
            "failed": len(failed),
            "failed_ids": failed[:20],
        }

    def detail(self) -> dict[str, Any]:
        return {**self.summary(), "targets": [t.as_json() for t in self.targets]}


class Recent:
    """A ring of the last ``keep`` aggregates (fewer when they hold more than
    ``max_targets`` targets together) and every upstream's rolling minute."""

    def __init__(
        self,
        keep: int,
        upstreams: Collection[str],
        max_targets: int = MAX_KEPT_TARGETS,
        worker: tuple[int, int] = (0, 1),
    ) -> None:
        self.records: collections.deque[AggregateRecord] = collections.deque(maxlen=keep)
        self.upstreams = {name: RollingStats() for name in upstreams}
        # Worker i of n numbers its aggregates i+1, i+1+n, ...: numbers never met twice in
        # the process group, whose admin page lists every worker's (admin/group.py).
        index, self._step = worker
        self._seq = index + 1 - self._step
        self._targets = 0  # kept, over all records
        self._max_targets = max_targets

    def __repr__(self) -> str:
        return f"<Recent [{len(self.records)}/{self.records.maxlen} aggregates]>"

    def track(self, upstreams: Collection[str]) -> None:
        """Keeps a last minute for each of ``upstreams`` not tracked yet (a config reload)."""
        for name in upstreams:
            self.upstreams.setdefault(name, RollingStats())

    def record(self, call: CallRecord) -> None:
        """Keeps one aggregate: every target it reported, and those its cancellation cut."""
        planned = {t.id: t for t in call.plan.targets} if call.plan is not None else {}
        results = call.results()
        rows = tuple(map(_row, results, call.outcomes(), call.latencies_ns(), repeat(planned)))
        self._seq += self._step
        self._keep(
            AggregateRecord(
                self._seq, call.request_id[:MAX_TEXT], call.aggregate[:MAX_TEXT], call.code.name,
                time.time(), call.elapsed_ns, call.deadline_ns, call.cutoff_ns, call.requested,
                rows,
            )
        )  # fmt: skip
        now = int(time.monotonic())
        unsent, upstreams = call.unsent, self.upstreams
        ok = pb.OUTCOME_OK
        for target_id, upstream, _, _, outcome, _, _, _, latency, _, cache, fallback in rows:
            stats = upstreams.get(upstream)
            # Only what the upstream did: not what was refused here or cut for another reason.
            if stats is None or outcome in SAYS_NOTHING_OF_UPSTREAM or target_id in unsent:
                continue
            stats.add(now, latency, outcome != ok or fallback, cache)

    def _keep(self, record: AggregateRecord) -> None:
        records = self.records
        if len(records) == records.maxlen:
            self._targets -= len(records.popleft().rows)
        records.append(record)
        self._targets += len(record.rows)
        while self._targets > self._max_targets and len(records) > 1:
            self._targets -= len(records.popleft().rows)

    def find(self, request_id: str, seq: int | None = None) -> AggregateRecord | None:
        """The newest aggregate with that request id, or the one numbered ``seq``: request ids
        come from callers, so one caller may reuse another's, and the page links by both."""
        for record in reversed(self.records):
            if record.request_id == request_id and (seq is None or record.seq == seq):
                return record
        return None

    def newest(self, failed: bool = False, slowest: int | None = None) -> list[AggregateRecord]:
        """Newest first; only failed ones (a status other than OK, or a failed target); or the
        ``slowest`` N, slowest first."""
        chosen: Iterator[AggregateRecord] = reversed(self.records)
        if failed:
            chosen = (r for r in chosen if r.status != "OK" or r.failed)
        if slowest is not None:
            return sorted(chosen, key=lambda r: r.elapsed_ns, reverse=True)[:slowest]
        return list(chosen)

    def upstream_stats(self, name: str) -> dict[str, Any]:
        return self.upstreams[name].summary(int(time.monotonic()))

    def upstream_window(self, name: str) -> dict[str, Any]:
        return self.upstreams[name].window(int(time.monotonic()))


def _row(
    result: pb.TargetResult, outcome: int, latency_ns: int, planned: dict[str, PlannedTarget]
) -> Row:
    """What a record keeps of a target: every text cut to MAX_TEXT (a slice of a shorter text
    is no copy)."""
    target_id = result.id
    # An element of a for_each target is "id[index]".
    target = planned.get(target_id) or planned.get(target_id.rpartition("[")[0])
    upstream = method = path = ""
    status: int | str | None = None
    from_fallback = result.from_fallback
    if target is not None:
        upstream, request = target.upstream.name, target.request
        method = request.method
        if isinstance(request, HttpRequest):
            path = (request.template or request.path)[:MAX_TEXT]
            status = result.http_status or None
        elif (grpc_code := result.grpc_code) or (outcome == pb.OUTCOME_OK and not from_fallback):
            status = CODE_NAMES.get(grpc_code, str(grpc_code))
    start = result.start_offset
    return (
        target_id[:MAX_TEXT], upstream[:MAX_TEXT], method[:MAX_TEXT], path, outcome, status,
        result.error[:MAX_TEXT], start.seconds * 1_000_000_000 + start.nanos, latency_ns,
        result.attempts, result.cache, from_fallback,
    )  # fmt: skip
