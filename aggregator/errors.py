"""Expected failures, each carrying what it becomes: a target's outcome or the call's status.

Bugs are ordinary exceptions; these are not bugs. They are translated at one boundary each:
``TargetFailure`` in the fan-out (into a TargetResult), ``CallFailure`` in the servicer
(into a gRPC status with trailers).
"""

from __future__ import annotations

import grpc

from aggregator.v1 import aggregator_pb2 as pb


class TargetFailure(Exception):
    """One target did not get a good answer; ``outcome`` is an ``Outcome`` enum value."""

    def __init__(
        self,
        outcome: pb.Outcome,
        sentence: str,
        *,
        http_status: int = 0,
        grpc_code: int = 0,
    ) -> None:
        super().__init__(sentence)
        self.outcome = outcome
        self.sentence = sentence
        self.http_status = http_status
        self.grpc_code = grpc_code


class CallFailure(Exception):
    """The whole Aggregate call ends with ``code`` and a message naming what failed."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidRequest(CallFailure):
    """The request is malformed; nothing was sent upstream. One problem per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        self.problems = problems
