"""Reads typed values out of parsed YAML, collecting one problem per bad key, each led by its
key path (``upstreams.catalog.retry.backoff: ...``). A section's keys, converters, defaults and
required keys come from its dataclass's declared fields (config/schema.py)."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def key_label(key: Any) -> str:
    """A key as it may appear in a one-line problem: as written, or quoted (repr) when it
    holds a line break, which would split the problem in two."""
    text = str(key)
    return text if text.splitlines() in ([text], []) else repr(text)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def kind_of(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def keys_of(cls: type) -> set[str]:
    """The config keys of a section: its declared fields, less those the reader derives."""
    return {f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")}


class Reader:
    """Collects the problems of one document as its sections are read."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def section(self, raw: Any, path: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problems.append(f"{path}: must be a mapping, got {kind_of(raw)}")
            return {}
        return raw

    def required(self, raw: Mapping[str, Any], keys: Iterable[str], path: str) -> None:
        for key in keys:
            if key not in raw:
                self.problems.append(f"{join(path, key)}: required")

    def unknown(self, raw: Mapping[str, Any], known: Collection[str], path: str) -> None:
        for key in raw:
            if key not in known:
                self.problems.append(
                    f"{join(path, key_label(key))}: unknown key{_hint(key, known)}"
                )

    def value(
        self,
        raw: Mapping[str, Any],
        key: str,
        path: str,
        convert: Callable[[Any], T],
        default: T,
    ) -> T:
        if key not in raw:
            return default
        try:
            return convert(raw[key])
        except ValueError as exc:
            self.problems.append(f"{join(path, key)}: {exc}")
            return default

    def field(
        self, raw: Mapping[str, Any], cls: type, name: str, path: str, variant: str = ""
    ) -> Any:
        """The value of the declared field ``name`` of ``cls``, converted as declared (with
        its ``variant`` converter when it declares one, e.g. for one kind of upstream)."""
        declared = _fields(cls)[name]
        meta = declared.metadata
        convert = meta.get(f"convert_{variant}", meta["convert"])
        return self.value(raw, name, path, convert, _fallback(declared))

    def fields(
        self,
        raw: Mapping[str, Any],
        cls: type,
        path: str,
        skip: Collection[str] = (),
        variant: str = "",
        sections: Mapping[str, Callable[[Any, str], Any]] | None = None,
    ) -> dict[str, Any]:
        """Every declared field of ``cls`` not in ``skip``, in declaration order: each key
        converted, and each sub-section in ``sections`` read by its reader when present."""
        values = {}
        for name, declared in _fields(cls).items():
            if name in skip:
                continue
            if "convert" in declared.metadata:
                values[name] = self.field(raw, cls, name, path, variant)
            elif sections and name in sections and raw.get(name) is not None:
                values[name] = sections[name](raw[name], join(path, name))
        return values

    def simple_section(self, raw: Any, cls: type[T], path: str) -> tuple[T, dict[str, Any]]:
        """A section whose keys are exactly the converted fields of ``cls``: unknown keys,
        missing required keys, then each value. Returns it with its raw mapping."""
        section = self.section(raw, path)
        self.unknown(section, keys_of(cls), path)
        self.required(section, required_keys(cls), path)
        return cls(**self.fields(section, cls, path)), section


def required_keys(cls: type) -> list[str]:
    """The keys of ``cls`` a document must give (a field without a default)."""
    return [
        f.name
        for f in dataclasses.fields(cls)
        if "convert" in f.metadata
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _fallback(declared: dataclasses.Field[Any]) -> Any:
    """What a field holds when its key is missing or bad: its default, or for a required key,
    a stand-in (the document is refused anyway; the stand-in lets the rest be checked)."""
    if declared.default is not dataclasses.MISSING:
        return declared.default
    if declared.default_factory is not dataclasses.MISSING:
        return declared.default_factory()
    return declared.metadata["fallback"]


def _hint(key: Any, known: Collection[str]) -> str:
    """``; did you mean `timeout`?`` for a key a known one resembles, else nothing."""
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"; did you mean `{close[0]}`?" if close else ""
