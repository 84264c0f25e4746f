"""Expected failures, each carrying what it becomes: a target's outcome or the call's status.

Bugs are ordinary exceptions; these are not bugs. They are translated at one boundary each:
``TargetFailure`` in the fan-out (into a TargetResult), ``CallFailure`` in the servicer
(into a gRPC status with trailers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from aggregator.v1 import aggregator_pb2 as pb


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong with a request: the target (by id; None for the request as a whole), the
    field and a message naming fields, templates and sizes, never a caller's value. Rendered at
    the edges: a status message (``str``), a ``google.rpc.BadRequest`` field violation, a key
    path in the config (aggregates.py)."""

    target: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.field if self.target is None else _labelled(self.target, self.field)
        return f"{where}: {self.message}" if where else self.message

    @property
    def violation_field(self) -> str:
        """The field as BadRequest names it: ``targets[price].http.path``."""
        if self.target is None:
            return self.field
        return f"targets[{self.target}]" + (f".{self.field}" if self.field else "")


def _labelled(target: str, field: str) -> str:
    return f"target {target!r}: {field}" if field else f"target {target!r}"


class Rule(NamedTuple):
    """One rule: a cheap predicate (a Python expression over the table's subject) and the
    problem when it fails: its field and ``message(*subject)``, which names no values.

    Rules of one ``group`` are one chain: after the first of them fails, the rest are not
    asked (a path too long is not also reported as badly shaped)."""

    field: str | Callable[..., str]
    holds: str
    message: Callable[..., str]
    group: str = ""


class Rules:
    """A table of rules, walked two ways that cannot disagree: ``all_hold`` is the conjunction
    of the predicates compiled into one function (the fast path: ``a and b and ...``, stopping
    at the first failure) and ``broken`` asks each predicate in turn for every problem.

    The predicates are expressions of the module that declares the table (``namespace``), never
    of input: compiling them once at import is what makes the fast path as cheap as checks
    written inline."""

    def __init__(self, subject: str, rules: Sequence[Rule], namespace: dict[str, Any]) -> None:
        self.rules = tuple(rules)
        conjunction = " and ".join(f"({rule.holds})" for rule in self.rules) or "True"
        self.all_hold: Callable[..., bool] = eval(f"lambda {subject}: {conjunction}", namespace)
        self._checks: tuple[Callable[..., bool], ...] = tuple(
            eval(f"lambda {subject}: {rule.holds}", namespace) for rule in self.rules
        )

    def __repr__(self) -> str:
        return f"<Rules [{len(self.rules)} rules]>"

    def broken(self, target: str | None, *subject: Any) -> Iterator[Problem]:
        """The problem of every rule ``subject`` breaks."""
        failed: set[str] = set()
        for rule, holds in zip(self.rules, self._checks, strict=True):
            if rule.group in failed or holds(*subject):
                continue
            if rule.group:
                failed.add(rule.group)
            field = rule.field if isinstance(rule.field, str) else rule.field(*subject)
            yield Problem(target, field, rule.message(*subject))


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
    """The request is malformed; nothing was sent upstream. ``details``: each problem as a
    value; ``problems``: each as a sentence (a plain string is a problem of no field)."""

    def __init__(self, problems: Sequence[Problem | str]) -> None:
        self.details = tuple(
            p if isinstance(p, Problem) else Problem(None, "", p) for p in problems
        )
        self.problems = [str(problem) for problem in self.details]
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, _listed(self.problems))

    def status_details(self) -> bytes:
        """A ``google.rpc.Status`` for grpc-status-details-bin: this call's code and message
        and a BadRequest with one field violation per problem, as many as MAX_DETAILS_SIZE
        holds (the message itself is cut at MAX_PROBLEMS_SIZE, so both fit the trailers)."""
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=self.message)
        request = error_details_pb2.BadRequest()
        size = 0
        for problem in self.details:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=problem.violation_field, description=problem.message
            )
            size += violation.ByteSize() + 3
            if size > MAX_DETAILS_SIZE:
                break
            request.field_violations.append(violation)
        packed = any_pb2.Any()
        packed.Pack(request)
        status.details.append(packed)
        return bytes(status.SerializeToString())


# The status message travels as grpc-message metadata beside the trailers, and grpc rejects
# metadata over 8 KiB at random (over 16 KiB always): a refused call would then end as
# RESOURCE_EXHAUSTED instead of its own status. Messages are kept under these sizes, counted
# as sent (percent-encoded: a byte outside printable ASCII costs three).
# The status details (base64 on the wire: x4/3) repeat the message and add the field violations:
# message, details and the other trailers together stay under ~7.5 KiB.
MAX_PROBLEMS_SIZE = 2048
MAX_DETAILS_SIZE = 1536
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
