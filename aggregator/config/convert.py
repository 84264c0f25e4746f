"""Converters: each takes a value as YAML parsed it and returns it typed, or raises ValueError
with the sentence that follows the key path in the problem (the value quoted, never a guess)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import grpc

from aggregator.durations import parse_duration
from aggregator.hosts import bare_host, is_ip
from aggregator.security.fields import canonical_header, steering
from aggregator.vocabulary import (
    CONTROL_OR_SPACE,
    FRAMING_HEADERS,
    GRPC_METHOD_PATTERN,
    HTTP_METHODS,
    METADATA_KEY,
    NAME,
    TOKEN,
    UNFORWARDABLE,
)

C = TypeVar("C", bound=str)

JWT_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
     "ES256", "ES384", "ES512", "EdDSA"}
)  # fmt: skip


def duration(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration string (use 250ms, 2s, 1m)")
    return parse_duration(value)


def positive_duration(value: Any) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be longer than 0")
    return seconds


def positive_duration_or_off(value: Any) -> float:
    """A positive duration, or "" for off (0)."""
    return 0.0 if value == "" else positive_duration(value)


def at_least(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        if value < minimum:
            raise ValueError(f"{value} must be at least {minimum}")
        return value

    return convert


def between(low: int, high: int) -> Callable[[Any], int]:
    lower = at_least(low)

    def convert(value: Any) -> int:
        if lower(value) > high:
            raise ValueError(f"{value} must be at most {high}")
        return int(value)

    return convert


def number(low: float, high: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{value!r} is not a number")
        if not low <= value <= high:
            raise ValueError(f"{value} must be between {low:g} and {high:g}")
        return float(value)

    return convert


def choice(*choices: C) -> Callable[[Any], C]:
    """A converter accepting exactly one of ``choices``."""

    def convert(value: Any) -> C:
        for option in choices:
            if value == option:
                return option
        raise ValueError(f"{value!r} must be {' or '.join(choices)}")

    return convert


def log_level(value: Any) -> str:
    if value not in ("debug", "info", "warning", "error"):
        raise ValueError(f"{value!r} must be debug, info, warning or error")
    return str(value)


def host_port(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a host:port string")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:50061)")
    return value


def listen_address(value: Any) -> str:
    if value == "":
        return ""
    return host_port(value)


_HOST_NAME = re.compile(
    r"^(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\Z"
)


def host_names(value: Any) -> tuple[str, ...]:
    """Host names (or IP addresses) as a Host header names them, without a port."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{value!r} is not a list of host names")
    names = tuple(bare_host(v) for v in value)
    for name in names:
        if not _HOST_NAME.match(name) and not is_ip(name):
            raise ValueError(f"{name[:64]!r} is not a host name (no port, no scheme)")
    return names


def base_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a URL")
    if CONTROL_OR_SPACE.search(value):
        raise ValueError(f"{value!r} contains whitespace or control characters")
    parts = urlsplit(value)
    parts.port  # noqa: B018 -- reading it validates it (ValueError names the bad port)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{value!r} must not carry a query, fragment or credentials")
    return value.rstrip("/")


def strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{value!r} is not a list of non-empty strings")
    return tuple(value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def string(value: Any) -> str:
    """Any string, the empty one included."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def grpc_codes(value: Any) -> tuple[str, ...]:
    names = {code.name for code in grpc.StatusCode} - {"OK"}
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{value!r} is not a list of gRPC status code names")
    unknown = [v for v in value if v not in names]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not gRPC status code names (e.g. UNAVAILABLE)")
    return tuple(value)


def key_prefix(value: Any) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise ValueError(f"{value!r} is not 1 to 64 of A-Z a-z 0-9 _ . -")
    return value


def redis_url(value: Any) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{value!r} is not a redis:// or rediss:// URL")
    return value


def forward_headers(value: Any) -> tuple[str, ...]:
    names = tuple(name.lower() for name in strings(value))
    for name in names:
        if not METADATA_KEY.match(name) or name.endswith("-bin") or name.startswith("grpc-"):
            raise ValueError(f"{name!r} is not a forwardable metadata key ([0-9a-z_.-], no -bin)")
        if name in UNFORWARDABLE:
            raise ValueError(f"{name!r} is a hop-by-hop or reserved header and is never forwarded")
    return names


def allowed_headers(value: Any) -> tuple[str, ...]:
    names = tuple(name.lower() for name in strings(value))
    for name in names:
        canonical = canonical_header(name)
        if not TOKEN.match(name) or name != name.lower():
            raise ValueError(f"{name!r} is not a header name")
        if canonical in FRAMING_HEADERS:
            raise ValueError(f"{name!r} is a hop-by-hop or framing header and is never sent")
        if not steering(canonical):
            raise ValueError(
                f"{name!r} is not refused by default (only identity, method-override and "
                "URL-rewrite headers need allowing)"
            )
    return names


def http_methods(value: Any) -> tuple[str, ...]:
    methods = tuple(method.upper() for method in strings(value))
    unknown = [method for method in methods if method not in HTTP_METHODS]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not one of {', '.join(sorted(HTTP_METHODS))}")
    return methods


def grpc_methods(value: Any) -> tuple[str, ...]:
    methods = strings(value)
    for method in methods:
        if not GRPC_METHOD_PATTERN.match(method):
            raise ValueError(f"{method!r} is not /package.Service/Method or /package.Service/*")
    return methods


def path_prefixes(value: Any) -> tuple[str, ...]:
    prefixes = strings(value)
    for prefix in prefixes:
        segments = prefix.split("/")
        if not prefix.startswith("/") or re.search(r"[\s?#\\%]", prefix) or ".." in segments:
            raise ValueError(f"{prefix!r} is not a plain path starting with / (no ?, #, %, ..)")
    return prefixes


def max_concurrency(value: Any) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    try:
        return at_least(1)(value)
    except ValueError:
        raise ValueError(f"{value!r} is not auto nor an integer of at least 1") from None


def endpoints(convert: Callable[[Any], str]) -> Callable[[Any], tuple[str, ...]]:
    """A string or a non-empty list of strings, each checked by ``convert``."""

    def read(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            return (convert(value),)
        if not value:
            raise ValueError("an empty list (give at least one)")
        entries = []
        for i, entry in enumerate(value):
            try:
                entries.append(convert(entry))
            except ValueError as exc:
                raise ValueError(f"entry {i}: {exc}") from None
        return tuple(entries)

    return read


def same_origin_shape(urls: tuple[str, ...]) -> None:
    """The URLs of one upstream differ only in their host and port: one scheme, one path."""
    first = urlsplit(urls[0])
    for i, url in enumerate(urls[1:], 1):
        parts = urlsplit(url)
        if parts.scheme != first.scheme:
            raise ValueError(
                f"entry {i}: {url!r} mixes schemes ({parts.scheme} after {first.scheme})"
            )
        if parts.path.rstrip("/") != first.path.rstrip("/"):
            raise ValueError(f"entry {i}: {url!r} has another path than {urls[0]!r}")


def jwt_algorithms(value: Any) -> tuple[str, ...]:
    algorithms = strings(value)
    unknown = [name for name in algorithms if name not in JWT_ALGORITHMS]
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: not one of {', '.join(sorted(JWT_ALGORITHMS))} "
            '("none" is never accepted)'
        )
    return algorithms


def json_value_problem(value: Any) -> str | None:
    """Why ``value`` cannot stand for a parameter (None when it can)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if item is None:
            return "null is not a value (leave the default out to make it required)"
        if isinstance(item, float) and not math.isfinite(item):
            return "NaN and Infinity are not JSON numbers"
        if isinstance(item, str):
            if "{{" in item:
                return f"{item!r}: values may not contain {{{{ (references are the config's own)"
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif not isinstance(item, bool | int | float):
            return f"{item!r} is not a JSON value (string, number, boolean, list or mapping)"
    return None
