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
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aggregator.errors import TargetFailure
from aggregator.security.fields import header_value_problem
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


class Substitution:
    """Renders the templates of one target given the values of its sources."""

    def __init__(self, sources: Iterable[str], value_of: Callable[[str], Any]) -> None:
        self._sources = Sources(sources)
        self._value_of = value_of

    def _lookup(self, raw: str) -> Any:
        reference = self._sources.parse(raw)
        assert reference is not None, "references are checked when the plan is made"
        return resolve(reference, self._value_of)

    def text(self, template: str) -> str:
        return _REFERENCE.sub(lambda m: as_text(self._lookup(m.group(1))), template)

    def path(self, template: str) -> str:
        def segment(match: re.Match[str]) -> str:
            text = as_text(self._lookup(match.group(1)))
            if text in (".", ".."):
                raise TargetFailure(
                    pb.OUTCOME_ERROR, f"{{{{{match.group(1)}}}}} is {text!r}: not a path segment"
                )
            return quote(text, safe="")

        return _REFERENCE.sub(segment, template)

    def header(self, template: str) -> str:
        text = self.text(template)
        problem = header_value_problem(text)
        if problem is not None:
            raise TargetFailure(pb.OUTCOME_ERROR, f"header {template}: {problem}")
        return text

    def metadata(self, template: str) -> str:
        """A gRPC metadata value: printable ASCII only, as grpc sends it."""
        text = self.text(template)
        if any(not " " <= ch <= "~" for ch in text):
            raise TargetFailure(
                pb.OUTCOME_ERROR, f"{template} gives a metadata value that is not printable ASCII"
            )
        return text

    def json(self, value: Any) -> Any:
        """Substitutes inside a JSON value; a string that is one whole reference keeps the
        referenced value's type (a number stays a number)."""
        if isinstance(value, str):
            whole = _WHOLE.match(value)
            return self._lookup(whole.group(1)) if whole else self.text(value)
        if isinstance(value, list):
            return [self.json(element) for element in value]
        if isinstance(value, dict):
            return {key: self.json(element) for key, element in value.items()}
        return value
