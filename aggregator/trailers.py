"""The x-aggregate-* trailers (docs/api.md), kept together well under grpc's 8 KiB metadata limit.

Id lists are cut to a byte budget each and end with ``+N more``; the summary keeps its counts
and as many failure entries as fit. The stream itself always holds the full detail.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aggregator.errors import CallFailure, wire_size
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import STATUS_DETAILS

# Budgets in bytes: three id lists, the summary (base64 on the wire: x4/3) and the fixed
# trailers together stay under ~7.5 KiB, grpc's hard rejection starting above 8 KiB.
LIST_BUDGET = 1400
SUMMARY_BUDGET = 2000
# What the lists and the summary may take together, as sent; a failed call's status message and
# details come out of it, so that everything together stays under ~7.5 KiB.
_SHARED = 3 * LIST_BUDGET + SUMMARY_BUDGET * 4 // 3

Metadata = tuple[tuple[str, str | bytes], ...]


def trailers(
    results: Iterable[pb.TargetResult],
    budget_seconds: float,
    elapsed_seconds: float,
    failure: CallFailure | None = None,
) -> Metadata:
    """The trailing metadata of an aggregate whose targets ended with ``results`` (and, when
    it failed, the status details of ``failure``)."""
    if failure is None:
        return _aggregate_trailers(results, budget_seconds, elapsed_seconds, 1.0)
    details = failure.status_details()
    taken = wire_size(failure.sent_message) + len(details) * 4 // 3 + 100  # keys and framing
    share = max(0.2, (_SHARED - taken) / _SHARED)
    return (
        *_aggregate_trailers(results, budget_seconds, elapsed_seconds, share),
        (STATUS_DETAILS, details),
    )


def _aggregate_trailers(
    results: Iterable[pb.TargetResult], budget_seconds: float, elapsed_seconds: float, share: float
) -> Metadata:
    """The x-aggregate-* trailers, the lists and the summary within ``share`` of their budgets."""
    results = list(results)
    failed: list[str] = []
    timed_out: list[str] = []
    fallback: list[str] = []
    for result in results:  # one pass: most results are OK and from no fallback
        if result.outcome != pb.OUTCOME_OK:
            failed.append(result.id)
            if result.outcome == pb.OUTCOME_TIMEOUT:
                timed_out.append(result.id)
        if result.from_fallback:
            fallback.append(result.id)
    completed = bool(results) and not failed and not fallback
    list_budget, budget = int(LIST_BUDGET * share), int(SUMMARY_BUDGET * share)
    return (
        ("x-aggregate-completed", "true" if completed else "false"),
        ("x-aggregate-succeeded", str(len(results) - len(failed))),
        ("x-aggregate-failed", cut_ids(failed, list_budget)),
        ("x-aggregate-timed-out", cut_ids(timed_out, list_budget)),
        ("x-aggregate-fallback", cut_ids(fallback, list_budget)),
        ("x-aggregate-deadline-ms", str(round(budget_seconds * 1000))),
        ("x-aggregate-elapsed-ms", f"{elapsed_seconds * 1000:.3f}"),  # to the microsecond
        ("x-aggregate-summary-bin", summary(results, len(timed_out), len(fallback), budget)),
    )


def cut_ids(ids: Sequence[str], budget: int) -> str:
    """Comma-joins ``ids``, cut to ``budget`` bytes with a ``+N more`` tail when they overflow."""
    joined = ",".join(ids)
    if len(joined) <= budget:
        return joined
    kept: list[str] = []
    size = 0
    tail_room = len(f",+{len(ids)} more")
    for target_id in ids:
        if size + len(target_id) + 1 + tail_room > budget:
            break
        kept.append(target_id)
        size += len(target_id) + 1
    return ",".join([*kept, f"+{len(ids) - len(kept)} more"])


def summary(
    results: Sequence[pb.TargetResult],
    timed_out: int,
    fallback: int,
    budget: int = SUMMARY_BUDGET,
) -> bytes:
    """AggregateSummary, serialized: counts of every outcome plus the non-OK targets that fit
    in ``budget`` bytes."""
    failures = [r for r in results if r.outcome != pb.OUTCOME_OK]
    message = pb.AggregateSummary(
        targets=len(results),
        succeeded=len(results) - len(failures),
        failed=len(failures),
        timed_out=timed_out,
        fallback=fallback,
    )
    if not failures:
        return message.SerializeToString()
    size = message.ByteSize() + 8  # room for failures_omitted
    for index, result in enumerate(failures):
        entry = pb.TargetSummary(id=result.id, outcome=result.outcome, latency=result.latency)
        size += entry.ByteSize() + 3
        if size > budget:
            message.failures_omitted = len(failures) - index
            break
        message.failures.append(entry)
    return message.SerializeToString()
