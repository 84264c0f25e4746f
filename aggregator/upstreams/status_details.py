"""An upstream's error details (``grpc-status-details-bin``, a ``google.rpc.Status``) in words.

The readable kinds become words after the upstream's own message (an ``ErrorInfo``'s reason and
domain, a ``BadRequest``'s field violations, a ``RetryInfo``'s delay, a ``ResourceInfo``...);
others are named by their type URL. ``DebugInfo`` is named, never quoted: stack traces stay
upstream. The words are bounded, whatever the upstream sends::

    ErrorInfo SKU_LOCKED (shop.example.com); BadRequest sku: must be 8 digits; retry in 0.3s
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2

KEY = "grpc-status-details-bin"
MAX_DETAILS = 16  # details read; the rest are counted
MAX_SIZE = 512  # characters of words about them
_MAX_ITEMS = 8  # violations (or quota, precondition entries) named per detail
_PREFIX = "type.googleapis.com/"


@dataclass(frozen=True, slots=True)
class Details:
    words: str = ""
    retry_after: float | None = None  # a RetryInfo's delay, in seconds


def read_details(metadata: Iterable[Any] | None) -> Details:
    """The words for the details among trailing ``metadata`` (empty when there are none)."""
    raw = next((value for key, value in metadata or () if key == KEY), None)
    if not isinstance(raw, bytes):
        return Details()
    try:
        status = status_pb2.Status.FromString(raw)
    except message.DecodeError:
        return Details("its error details are not a google.rpc.Status")
    words: list[str] = []
    retry_after = None
    for packed in status.details[:MAX_DETAILS]:
        name = packed.type_url.removeprefix(_PREFIX)
        if name == "google.rpc.RetryInfo":
            retry_after = _retry_delay(packed)
        words.append(_words(packed, name))
    left = len(status.details) - MAX_DETAILS
    if left > 0:
        words.append(f"and {left} more details")
    return Details(_bounded("; ".join(words)), retry_after)


def _words(packed: any_pb2.Any, name: str) -> str:
    reader = _READERS.get(name)
    if reader is None:
        return clean(packed.type_url, 120)
    detail = reader[0]()
    try:
        detail.ParseFromString(packed.value)
    except message.DecodeError:
        return f"{name.removeprefix('google.rpc.')} (unreadable)"
    return reader[1](detail)


def _retry_delay(packed: any_pb2.Any) -> float | None:
    info = error_details_pb2.RetryInfo()
    try:
        info.ParseFromString(packed.value)
    except message.DecodeError:
        return None
    delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return delay if delay > 0 else None


def _error_info(info: Any) -> str:
    return f"ErrorInfo {clean(info.reason)} ({clean(info.domain)})"


def _bad_request(bad: Any) -> str:
    violations = [
        f"{clean(v.field)}: {clean(v.description)}" for v in bad.field_violations[:_MAX_ITEMS]
    ]
    return "BadRequest " + ", ".join(violations)


def _retry_info(info: Any) -> str:
    return f"retry in {info.retry_delay.seconds + info.retry_delay.nanos / 1e9:g}s"


def _resource_info(info: Any) -> str:
    owner = f" owned by {clean(info.owner)}" if info.owner else ""
    what = f"{clean(info.resource_type)} {clean(info.resource_name)!r}"
    return f"ResourceInfo {what}{owner}: {clean(info.description)}"


def _precondition(failure: Any) -> str:
    items = [f"{clean(v.type)} {clean(v.subject)}: {clean(v.description)}"
             for v in failure.violations[:_MAX_ITEMS]]  # fmt: skip
    return "PreconditionFailure " + ", ".join(items)


def _quota(failure: Any) -> str:
    items = [f"{clean(v.subject)}: {clean(v.description)}" for v in failure.violations[:_MAX_ITEMS]]
    return "QuotaFailure " + ", ".join(items)


def _localized(localized: Any) -> str:
    return clean(localized.message)


def _debug(_: Any) -> str:
    return "DebugInfo (not shown)"


_READERS: dict[str, tuple[Callable[[], Any], Callable[[Any], str]]] = {
    "google.rpc.ErrorInfo": (error_details_pb2.ErrorInfo, _error_info),
    "google.rpc.BadRequest": (error_details_pb2.BadRequest, _bad_request),
    "google.rpc.RetryInfo": (error_details_pb2.RetryInfo, _retry_info),
    "google.rpc.ResourceInfo": (error_details_pb2.ResourceInfo, _resource_info),
    "google.rpc.PreconditionFailure": (error_details_pb2.PreconditionFailure, _precondition),
    "google.rpc.QuotaFailure": (error_details_pb2.QuotaFailure, _quota),
    "google.rpc.LocalizedMessage": (error_details_pb2.LocalizedMessage, _localized),
    "google.rpc.DebugInfo": (error_details_pb2.DebugInfo, _debug),
}


def clean(text: str, limit: int = 200) -> str:
    """One line of printable text, at most ``limit`` characters: how every word an upstream
    sends about an error is kept (its details here, its grpc-message in grpc.py), so none can
    break a log line or the admin page with a CR, LF or control character."""
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in text[: limit * 2]).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _bounded(words: str) -> str:
    return words if len(words) <= MAX_SIZE else words[: MAX_SIZE - 9] + " ... (cut)"
