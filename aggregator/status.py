"""How a failed required target becomes the call's gRPC status (SPEC §4)."""

from __future__ import annotations

import grpc

from aggregator.v1 import aggregator_pb2 as pb

_BY_OUTCOME = {
    pb.OUTCOME_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    pb.OUTCOME_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    pb.OUTCOME_CIRCUIT_OPEN: grpc.StatusCode.UNAVAILABLE,
    pb.OUTCOME_REJECTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    pb.OUTCOME_CANCELLED: grpc.StatusCode.CANCELLED,
}

# gRPC's own HTTP-to-gRPC mapping (doc/http-grpc-status-mapping.md).
_BY_HTTP_STATUS = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}

_BY_CODE_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_for(result: pb.TargetResult) -> grpc.StatusCode:
    """The status of a call whose required target ended with ``result`` (not SKIPPED)."""
    if result.outcome == pb.OUTCOME_ERROR:
        if result.grpc_code:
            return _BY_CODE_NUMBER.get(result.grpc_code, grpc.StatusCode.UNKNOWN)
        return _BY_HTTP_STATUS.get(result.http_status, grpc.StatusCode.UNKNOWN)
    return _BY_OUTCOME.get(result.outcome, grpc.StatusCode.UNKNOWN)
