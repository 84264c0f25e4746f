"""Whose doing an attempt's result is: the one rule that the breaker, outlier detection and the
adaptive concurrency limit all read (docs/resilience.md, "What counts as a failure").

Shared state answers only to what the upstream itself did. A caller's bad input (a 4xx, a gRPC
request the upstream could not parse) and this process's own doing (its limits, an open
breaker, the caller's deadline, a timeout that fired because the event loop was late,
cancellation) never count against an upstream, nor for it.
"""

from __future__ import annotations

import enum

import grpc

from aggregator.errors import TargetFailure
from aggregator.upstreams.seam import Reply
from aggregator.v1 import aggregator_pb2 as pb


class Blame(enum.Enum):
    UPSTREAM = "upstream"  # the upstream failed: counts against it
    NONE = "none"  # the upstream answered for itself: counts as healthy
    CALLER = "caller"  # the caller's input: says nothing of the upstream
    OURS = "ours"  # this process (limits, lateness, deadlines, cancellation): says nothing


class Unblamed(TargetFailure):
    """A failure that is not the upstream's: the caller's own deadline ran out, or the
    upstream's timeout fired while this process's event loop was late (it may have answered
    in time, unread)."""


_UPSTREAM_GRPC_CODES = frozenset(
    code.value[0]
    for code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    )
)
_CALLERS_GRPC_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT.value[0]})
# Outcomes the upstream had no part in: our own limits, an open breaker, the server stopping.
_OURS = frozenset({pb.OUTCOME_REJECTED, pb.OUTCOME_CIRCUIT_OPEN, pb.OUTCOME_CANCELLED})


def blame(result: Reply | TargetFailure) -> Blame:
    """Whose doing ``result`` is (the table is in docs/resilience.md)."""
    if isinstance(result, TargetFailure):
        return _failure_blame(result)
    if result.http_status:
        if result.http_status >= 500:
            return Blame.UPSTREAM
        if 400 <= result.http_status < 500 and result.http_status != 429:
            return Blame.CALLER  # 429 is the upstream's load, not the caller's request
        return Blame.NONE
    if result.unreadable_request or result.grpc_code in _CALLERS_GRPC_CODES:
        return Blame.CALLER
    return Blame.UPSTREAM if result.grpc_code in _UPSTREAM_GRPC_CODES else Blame.NONE


def _failure_blame(failure: TargetFailure) -> Blame:
    if isinstance(failure, Unblamed) or failure.outcome in _OURS:
        return Blame.OURS
    if failure.outcome in (pb.OUTCOME_UNAVAILABLE, pb.OUTCOME_TIMEOUT) or failure.protocol_error:
        return Blame.UPSTREAM
    return Blame.NONE


def failed(verdict: Blame) -> bool | None:
    """What a health record (breaker, outlier state) counts: True a failure, False a success,
    None nothing."""
    if verdict is Blame.UPSTREAM:
        return True
    return False if verdict is Blame.NONE else None
