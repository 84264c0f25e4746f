"""A target's result as the caller gets it: times from integer nanoseconds, what an upstream
answered or why it failed, and a fallback standing in (docs/api.md, "TargetResult")."""

from __future__ import annotations

from google.protobuf import duration_pb2

from aggregator.errors import TargetFailure
from aggregator.plan import PlannedTarget
from aggregator.upstreams.seam import Reply
from aggregator.v1 import aggregator_pb2 as pb


def timed_result(
    target_id: str,
    outcome: pb.Outcome,
    error: str,
    origin: int,
    started: int,
    ended: int,
) -> pb.TargetResult:
    """A result whose times are readings of time.perf_counter_ns()."""
    result = pb.TargetResult(id=target_id, outcome=outcome, error=error)
    set_duration(result.start_offset, started - origin)
    set_duration(result.latency, ended - started)
    return result


def set_duration(duration: duration_pb2.Duration, nanos: int) -> None:
    """Duration.FromNanoseconds for non-negative spans, without its validation and
    normalisation, which cost more than the rest of a result."""
    duration.seconds, duration.nanos = divmod(nanos, 1_000_000_000)


def failed(
    target_id: str,
    failure: TargetFailure,
    attempts: int,
    origin: int,
    started: int,
    ended: int,
) -> pb.TargetResult:
    result = timed_result(target_id, failure.outcome, failure.sentence, origin, started, ended)
    result.http_status = failure.http_status
    result.grpc_code = failure.grpc_code
    result.attempts = attempts
    return result


def answered(
    target: PlannedTarget, reply: Reply, origin: int, started: int, ended: int
) -> pb.TargetResult:
    if reply.ok:
        result = timed_result(target.id, pb.OUTCOME_OK, "", origin, started, ended)
    else:
        sentence = f"{target.upstream.name} answered {reply.reason}"
        result = timed_result(target.id, pb.OUTCOME_ERROR, sentence, origin, started, ended)
    # Only what is set: each field written costs (protobuf), and proto3's zero is the default.
    if reply.http_status:
        result.http_status = reply.http_status
    else:
        result.grpc_code = reply.grpc_code
    result.body = reply.body
    if reply.content_type:
        result.content_type = reply.content_type
    return result


def with_fallback(target: PlannedTarget, result: pb.TargetResult) -> pb.TargetResult:
    if target.fallback is None or result.outcome == pb.OUTCOME_OK:
        return result
    result.outcome = pb.OUTCOME_OK
    result.from_fallback = True
    result.json.CopyFrom(target.fallback)
    return result
