"""How a failed required target becomes the call's gRPC status (docs/api.md, "Status codes");
the tables are aggregator/outcomes.py's."""

from __future__ import annotations

import grpc

from aggregator.outcomes import CODES, STATUS_BY_OUTCOME, status_for_http
from aggregator.v1 import aggregator_pb2 as pb


def status_for(result: pb.TargetResult) -> grpc.StatusCode:
    """The status of a call whose required target ended with ``result`` (not SKIPPED)."""
    if result.outcome == pb.OUTCOME_ERROR:
        if result.grpc_code:
            return CODES.get(result.grpc_code, grpc.StatusCode.UNKNOWN)
        return status_for_http(result.http_status)
    return STATUS_BY_OUTCOME.get(result.outcome, grpc.StatusCode.UNKNOWN)
