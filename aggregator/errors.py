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
        protocol_error: bool = False,
        retry_after: float | None = None,
        unsent: bool = False,
    ) -> None:
        super().__init__(sentence)
        self.outcome = outcome
        self.sentence = sentence
        self.http_status = http_status
        self.grpc_code = grpc_code
        # What came back was not a valid answer (not HTTP, a broken body): counted against the
        # upstream's breaker like a 5xx, although the outcome is ERROR, as Envoy counts them.
        self.protocol_error = protocol_error
        # Seconds the upstream asked us to wait before retrying (a gRPC RetryInfo).
        self.retry_after = retry_after
        # Nothing reached the upstream (its connect was refused): another endpoint of it may
        # take the same attempt at once, whatever the method.
        self.unsent = unsent


class CallFailure(Exception):
    """The whole Aggregate call ends with ``code`` and a message naming what failed."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidRequest(CallFailure):
    """The request is malformed; nothing was sent upstream. One problem per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, _listed(problems))
        self.problems = problems


# The status message travels as grpc-message metadata beside the trailers, and grpc rejects
# metadata over 8 KiB at random (over 16 KiB always): a refused call would then end as
# RESOURCE_EXHAUSTED instead of its own status. Messages are kept under these sizes, counted
# as sent (percent-encoded: a byte outside printable ASCII costs three).
MAX_PROBLEMS_SIZE = 4096
MAX_MESSAGE_SIZE = 1024


def wire_size(text: str) -> int:
    return sum(1 if 0x20 <= byte < 0x7F and byte != 0x25 else 3 for byte in text.encode())


def _listed(problems: list[str]) -> str:
    """Every problem while they fit, then how many more there are."""
    kept: list[str] = []
    size = 0
    for problem in problems:
        size += wire_size(problem) + 2
        if size > MAX_PROBLEMS_SIZE - 40:
            break
        kept.append(problem)
    left = len(problems) - len(kept)
    return "; ".join(kept) + (f"; and {left} more problems" if left else "")


def status_message(message: str) -> str:
    """``message`` cut to fit MAX_MESSAGE_SIZE (an upstream's error can be any length)."""
    if wire_size(message) <= MAX_MESSAGE_SIZE:
        return message
    cut = message[: MAX_MESSAGE_SIZE - 20]
    while wire_size(cut) > MAX_MESSAGE_SIZE - 20:
        cut = cut[: len(cut) * 3 // 4]
    return cut + " ... (cut)"
