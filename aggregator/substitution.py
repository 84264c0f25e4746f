"""``{{id.field.path}}``: values from earlier results substituted into later calls.

References may appear in an HTTP target's path, query values, header values and string values
inside its JSON body, and in a gRPC target's metadata values and JSON request; ``{{item...}}``
names the element of a ``for_each`` expansion. Every reference is checked when the plan is
made (it must name a dependency); it is resolved when the target starts, against the
dependency's JSON body (a gRPC dependency's answer in its proto3 JSON mapping).

Values never change where a request goes: in a path they are percent-encoded (a ``/`` becomes
``%2F``, so no segment can be added, and ``.``/``..`` are refused); in a query they are
percent-encoded when the request is written; in headers a value with control characters is
refused by the same check as a value the caller set (security/fields.py).

Looking a reference up costs time linear in the reference, whatever the number of sources:
``Sources`` is built once per target and tries only the prefixes an id can be (ids are at most
64 characters), longest first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from aggregator.errors import TargetFailure
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import LONGEST_NAME

_REFERENCE = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")
_WHOLE = re.compile(r"^\{\{\s*([^{}\s]+)\s*\}\}\Z")
REFERENCE = _REFERENCE  # what a {{...}} reference is, for aggregates.py


@dataclass(frozen=True, slots=True)
class Reference:
    source: str  # a dependency's id, or "item"
    path: tuple[str, ...]

    def __str__(self) -> str:
        return "{{" + ".".join((self.source, *self.path)) + "}}"


def references(text: str) -> Iterator[str]:
    """The raw references (``user.id``) in ``text``."""
    for match in _REFERENCE.finditer(text):
        yield match.group(1)


def json_strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value, keys excluded."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for element in value:
            yield from json_strings(element)
    elif isinstance(value, dict):
        for element in value.values():
            yield from json_strings(element)


class Sources:
    """What the references of one target may name (its dependencies, and ``item``)."""

    __slots__ = ("_longest", "_names")

    def __init__(self, names: Iterable[str]) -> None:
        # A name longer than any id names no target (make_plan reports it): leaving it out
        # keeps every lookup within the first 64 characters of a reference.
        self._names = frozenset(name for name in names if len(name) <= LONGEST_NAME)
        self._longest = max(map(len, self._names), default=0)

    def __repr__(self) -> str:
        return f"<Sources {sorted(self._names)}>"

    def parse(self, raw: str) -> Reference | None:
        """Splits ``user.v1.id`` into a source (the longest that matches) and a path."""
        if raw in self._names:
            return Reference(raw, ())
        end = raw.rfind(".", 0, self._longest + 1)
        while end > 0:
            if raw[:end] in self._names:
                return Reference(raw[:end], tuple(raw[end + 1 :].split(".")))
            end = raw.rfind(".", 0, end)
        return None


def resolve(reference: Reference, value_of: Callable[[str], Any]) -> Any:
    """The value at ``reference`` in ``value_of(source)``; TargetFailure(ERROR) when absent."""
    value = value_of(reference.source)
    for step, key in enumerate(reference.path):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            walked = ".".join((reference.source, *reference.path[:step])) or reference.source
            raise TargetFailure(
                pb.OUTCOME_ERROR, f"{reference} does not resolve: {walked} has no {key!r}"
            )
    return value


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Cap:
    """How large a rendered field may grow: ``limit`` characters, named by the config ``key``
    (counted as it grows, so an oversized value is refused before it is built in full)."""

    field: str
    limit: int
    key: str

    def refused(self) -> TargetFailure:
        return TargetFailure(
            pb.OUTCOME_ERROR, f"{self.field}: exceeds {self.key} ({self.limit}) once rendered"
        )


class Substitution:
    """Renders the templates of one target given the values of its sources.

    Every rendering may be given a ``Cap``: the output is counted as it is built and the
    rendering stops with the cap's TargetFailure as soon as it would pass the limit, so a
    dependency's large value repeated in a template costs at most the cap, not its product."""

    def __init__(self, sources: Iterable[str], value_of: Callable[[str], Any]) -> None:
        self._sources = Sources(sources)
        self._value_of = value_of
        self._sizes: dict[int, int] = {}  # JSON size of referenced containers, by id

    def _lookup(self, raw: str) -> Any:
        reference = self._sources.parse(raw)
        assert reference is not None, "references are checked when the plan is made"
        return resolve(reference, self._value_of)

    def _render(self, template: str, encode: Callable[[str, str], str], cap: Cap | None) -> str:
        limit = cap.limit if cap is not None else -1
        out: list[str] = []
        size = at = 0
        for match in _REFERENCE.finditer(template):
            out.append(template[at : match.start()])
            text = as_text(self._lookup(match.group(1)))
            size += match.start() - at
            # Encoding never shortens a text: a text already too long is refused unencoded.
            if cap is not None and size + len(text) > limit:
                raise cap.refused()
            text = encode(text, match.group(1))
            size += len(text)
            if cap is not None and size > limit:
                raise cap.refused()
            out.append(text)
            at = match.end()
        out.append(template[at:])
        if cap is not None and size + len(template) - at > limit:
            raise cap.refused()
        return "".join(out)

    def text(self, template: str, cap: Cap | None = None) -> str:
        return self._render(template, _as_is, cap)

    def path(self, template: str, cap: Cap | None = None) -> str:
        return self._render(template, path_segment, cap)

    def header(self, template: str, cap: Cap | None = None) -> str:
        """A header value (its characters are checked with the request, outbound)."""
        return self.text(template, cap)

    def metadata(self, template: str, cap: Cap | None = None) -> str:
        """A gRPC metadata value (printable ASCII only: checked with the request, outbound)."""
        return self.text(template, cap)

    def json(self, value: Any, cap: Cap | None = None) -> Any:
        """Substitutes inside a JSON value; a string that is one whole reference keeps the
        referenced value's type (a number stays a number). With ``cap``, the substituted
        values (their JSON size) are counted against it as they are placed."""
        room = [cap.limit if cap is not None else -1]
        return self._json(value, cap, room)

    def _json(self, value: Any, cap: Cap | None, room: list[int]) -> Any:
        if isinstance(value, str):
            whole = _WHOLE.match(value)
            if whole:
                found = self._lookup(whole.group(1))
                self._spend(cap, room, self._json_size(found))
                return found
            if "{{" not in value:
                return value
            rendered = self.text(value, replace(cap, limit=room[0]) if cap is not None else None)
            self._spend(cap, room, len(rendered))
            return rendered
        if isinstance(value, list):
            return [self._json(element, cap, room) for element in value]
        if isinstance(value, dict):
            return {key: self._json(element, cap, room) for key, element in value.items()}
        return value

    @staticmethod
    def _spend(cap: Cap | None, room: list[int], size: int) -> None:
        if cap is None:
            return
        room[0] -= size
        if room[0] < 0:
            raise cap.refused()

    def _json_size(self, value: Any) -> int:
        """A lower bound of ``value``'s size as JSON; a container is measured once per object
        however many references name it."""
        if isinstance(value, str):
            return len(value) + 2
        if not isinstance(value, dict | list):
            return len(as_text(value))
        known = self._sizes.get(id(value))
        if known is None:
            known = self._sizes[id(value)] = len(json.dumps(value, separators=(",", ":")))
        return known


def _as_is(text: str, raw: str) -> str:
    return text


def path_segment(text: str, raw: str) -> str:
    """A value in a path: one whole segment, percent-encoded (a / becomes %2F); . and ..
    are refused, as they are no segment."""
    if text in (".", ".."):
        raise TargetFailure(pb.OUTCOME_ERROR, f"{{{{{raw}}}}} is . or ..: not a path segment")
    if _UNRESERVED.match(text):  # quote would leave it as it is
        return text
    return quote(text, safe="")


# Text that percent-encoding leaves as it is (checked after . and ..).
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*\Z")
