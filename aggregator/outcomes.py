"""What a target's outcome is called, and what a failed required target makes of its call.

One table of names for everyone who shows or counts an outcome (the admin page, the metrics,
the timeline) and one mapping to the call's gRPC status (docs/api.md, "Status codes"), so a
new outcome or a changed mapping is written here once. Below everything but the vocabulary:
it knows the wire enums and grpc's status codes, nothing of ours.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from aggregator.v1 import aggregator_pb2 as pb

# ok, error, timeout, unavailable, circuit_open, rejected, skipped, cancelled, unspecified: the
# names the admin page's JSON and the metrics' outcome label use (docs/admin.md), upper-cased by
# the timeline.
OUTCOME_NAMES: Mapping[int, str] = {
    value: name.removeprefix("OUTCOME_").lower() for name, value in pb.Outcome.items()
}
# unspecified (no cache on the path), miss, hit, stale.
CACHE_NAMES: Mapping[int, str] = {
    value: name.removeprefix("CACHE_STATUS_").lower() for name, value in pb.CacheStatus.items()
}

# Never reached an upstream: says nothing of its latency or error rate.
NOT_RUN = frozenset({pb.OUTCOME_SKIPPED, pb.OUTCOME_UNSPECIFIED})
# Refused on our side or cut by the caller: says nothing of an upstream's health either way.
SAYS_NOTHING_OF_HEALTH = frozenset(
    {pb.OUTCOME_REJECTED, pb.OUTCOME_CIRCUIT_OPEN, pb.OUTCOME_CANCELLED}
)
# What an upstream's error rate leaves out (the admin page; the dashboard's error share).
SAYS_NOTHING_OF_UPSTREAM = NOT_RUN | SAYS_NOTHING_OF_HEALTH

# gRPC codes by number, and their names (UNAVAILABLE) as the admin page shows an answer.
CODES: Mapping[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
CODE_NAMES: Mapping[int, str] = {number: code.name for number, code in CODES.items()}

# The call's status when a required target ended with this outcome (ERROR: see below).
STATUS_BY_OUTCOME: Mapping[int, grpc.StatusCode] = {
    pb.OUTCOME_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    pb.OUTCOME_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    pb.OUTCOME_CIRCUIT_OPEN: grpc.StatusCode.UNAVAILABLE,
    pb.OUTCOME_REJECTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    pb.OUTCOME_CANCELLED: grpc.StatusCode.CANCELLED,
}
# An HTTP upstream's error status, as Google's APIs map it (google/rpc/code.proto), not grpc's
# transport table (which reads a 404 as UNIMPLEMENTED and a 400 as INTERNAL: server bugs to
# every client and alert). Any other 4xx is FAILED_PRECONDITION, any other 5xx INTERNAL.
STATUS_BY_HTTP_STATUS: Mapping[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    412: grpc.StatusCode.FAILED_PRECONDITION,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_for_http(http_status: int) -> grpc.StatusCode:
    """The call's status when a required HTTP target answered ``http_status`` (an error)."""
    code = STATUS_BY_HTTP_STATUS.get(http_status)
    if code is not None:
        return code
    if 400 <= http_status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    if 500 <= http_status < 600:
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.UNKNOWN  # a 3xx (redirects are not followed), or no answer at all


def outcome_name(outcome: int) -> str:
    """``ok``, ``timeout``...; ``unspecified`` for a number the enum does not know."""
    return OUTCOME_NAMES.get(outcome, "unspecified")


def cache_name(cache: int) -> str:
    return CACHE_NAMES.get(cache, "unspecified")
