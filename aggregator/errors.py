"""Expected failures, each carrying what it becomes: a target's outcome or the call's status.

Bugs are ordinary exceptions; these are not bugs. They are translated at one boundary each:
``TargetFailure`` in the fan-out (into a TargetResult), ``CallFailure`` in the servicer
(into a gRPC status with trailers, and ``grpc-status-details-bin`` saying whose fault it is:
docs/api.md, "Error details").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from aggregator.v1 import aggregator_pb2 as pb

# ErrorInfo.domain of every status this service makes.
DOMAIN = "aggregator"


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
        self.namespace = namespace
        self.conjunction = " and ".join(f"({rule.holds})" for rule in self.rules) or "True"
        self.all_hold: Callable[..., bool] = eval(
            f"lambda {subject}: {self.conjunction}", namespace
        )
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


def conjunction(subject: str, *tables: Rules) -> Callable[..., bool]:
    """The predicates of ``tables`` as one conjunction, in order, over ``subject``, which names
    each table's own subject (a name two tables share must mean one thing to both): one call
    where each table was one, for a fast path that walks them together. Its names are the
    tables' own, which may not disagree."""
    namespace: dict[str, Any] = {}
    for table in tables:
        for name, value in table.namespace.items():
            if namespace.setdefault(name, value) is not value:
                raise ValueError(f"{name!r} is two things in the tables joined")
    joined = " and ".join(f"({table.conjunction})" for table in tables)
    function: Callable[..., bool] = eval(f"lambda {subject}: {joined}", namespace)
    return function


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
    """The whole Aggregate call ends with ``code`` and a message naming what failed.

    ``reason`` (UPPER_SNAKE, the code's name unless given) and ``metadata`` make the
    ``google.rpc.ErrorInfo`` a caller can branch on; ``details`` are further google.rpc
    messages (QuotaFailure, RetryInfo...)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or code.name
        self.metadata = dict(metadata or {})
        self.details = tuple(details)

    @property
    def sent_message(self) -> str:
        """The status message as sent: cut to MAX_MESSAGE_SIZE (an upstream's error can be
        any length)."""
        return status_message(self.message)

    def status_details(self) -> bytes:
        """A ``google.rpc.Status`` for grpc-status-details-bin: the code and message as sent
        (grpcio-status checks both) and the details, as many as MAX_DETAILS_SIZE holds."""
        status = status_pb2.Status(code=self.code.value[0], message=self.sent_message)
        size = 0
        for detail in (self._error_info(), *self._more_details()):
            size += detail.ByteSize() + 64  # the Any's type URL and framing
            if size > MAX_DETAILS_SIZE:
                break
            status.details.add().Pack(detail)
        return bytes(status.SerializeToString())

    def _error_info(self) -> error_details_pb2.ErrorInfo:
        metadata = {key: value[:MAX_METADATA_VALUE] for key, value in self.metadata.items()}
        return error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata)

    def _more_details(self) -> Sequence[Message]:
        if self.code == grpc.StatusCode.INVALID_ARGUMENT:
            return (bad_request([Problem(None, "", self.message)]), *self.details)
        return self.details


class InvalidRequest(CallFailure):
    """The request is malformed; nothing was sent upstream. ``found``: each problem as a
    value; ``problems``: each as a sentence (a plain string is a problem of no field). The
    status details carry them as a BadRequest, one field violation each."""

    def __init__(self, problems: Sequence[Problem | str]) -> None:
        self.found = tuple(p if isinstance(p, Problem) else Problem(None, "", p) for p in problems)
        self.problems = [str(problem) for problem in self.found]
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, _listed(self.problems))

    @property
    def sent_message(self) -> str:
        return self.message  # _listed cut it within MAX_PROBLEMS_SIZE

    def _more_details(self) -> Sequence[Message]:
        return (bad_request(self.found),)


def bad_request(problems: Sequence[Problem]) -> error_details_pb2.BadRequest:
    """One field violation per problem (``targets[price].http.path``), as many as
    MAX_DETAILS_SIZE holds beside the ErrorInfo."""
    request = error_details_pb2.BadRequest()
    size = 0
    for problem in problems:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=problem.violation_field, description=problem.message
        )
        size += violation.ByteSize() + 3
        if size > MAX_DETAILS_SIZE - 200:  # room for the ErrorInfo beside it
            break
        request.field_violations.append(violation)
    return request


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    nanos = round(seconds * 1e9)
    delay = duration_pb2.Duration(seconds=nanos // 10**9, nanos=nanos % 10**9)
    return error_details_pb2.RetryInfo(retry_delay=delay)


def quota_failure(subject: str, description: str) -> error_details_pb2.QuotaFailure:
    violation = error_details_pb2.QuotaFailure.Violation(
        subject=subject[:MAX_METADATA_VALUE], description=status_message(description)[:256]
    )
    return error_details_pb2.QuotaFailure(violations=[violation])


# The status message travels as grpc-message metadata beside the trailers, and grpc rejects
# metadata over 8 KiB at random (over 16 KiB always): a refused call would then end as
# RESOURCE_EXHAUSTED instead of its own status. Messages are kept under these sizes, counted
# as sent (percent-encoded: a byte outside printable ASCII costs three).
# The status details (base64 on the wire: x4/3) repeat the message and add the field violations:
# message, details and the other trailers together stay under ~7.5 KiB.
MAX_PROBLEMS_SIZE = 2048
MAX_MESSAGE_SIZE = 1024
MAX_DETAILS_SIZE = 1536
MAX_METADATA_VALUE = 128  # an ErrorInfo's metadata value (ids are 64, upstream names short)


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
