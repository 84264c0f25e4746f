"""The service's configuration: one YAML file, validated once at start.

Every problem is reported at once, one line each, naming its key path::

    upstreams.catalog.retry.backoff: "10 sec" is not a duration (use 250ms, 2s, 1m)

The result is a tree of frozen dataclasses passed explicitly to whatever needs it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import grpc
import yaml

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*\Z")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(text: str) -> float:
    """Seconds in a duration string: ``"250ms"`` -> 0.25, ``"2s"`` -> 2.0, ``"1m"`` -> 60.0."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (use 250ms, 2s, 1m)")
    return float(match.group(1)) * _SCALE[match.group(2)]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3  # in all, the first included
    backoff: float = 0.025
    max_backoff: float = 0.25
    budget: float = 0.2  # share of the last 10 s of requests that may be retries or hedges
    min_retries_per_second: float = 3.0  # the budget's floor, so a quiet upstream can retry
    grpc_codes: tuple[str, ...] = ("UNAVAILABLE",)


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    delay: float


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    fail_max: int = 5
    reset_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class CachePolicy:
    ttl: float
    stale_if_error: float = 0.0
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024  # bodies held in memory; one entry may use an eighth
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    kind: Literal["http", "grpc"]
    url: str = ""
    address: str = ""
    timeout: float = 2.0
    connect_timeout: float = 0.5
    max_concurrency: int = 100
    retry: RetryPolicy | None = None
    hedge: HedgePolicy | None = None
    circuit_breaker: BreakerPolicy | None = None
    rate_limit: RateLimit | None = None
    cache: CachePolicy | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    address: str = "[::]:50051"
    metrics_address: str = "0.0.0.0:9464"
    workers: int = 1
    max_targets: int = 100
    max_concurrent_calls: int = 1000
    default_deadline: float = 5.0
    max_deadline: float = 30.0
    deadline_margin: float = 0.020
    deadline_margin_ratio: float = 0.05
    shutdown_grace: float = 10.0
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)


class _Reader:
    """Reads typed values out of nested mappings, collecting one problem per bad key."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def section(self, raw: Any, path: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problems.append(f"{path}: must be a mapping, got {_kind(raw)}")
            return {}
        return raw

    def unknown(self, raw: Mapping[str, Any], known: set[str], path: str) -> None:
        for key in raw:
            if key not in known:
                self.problems.append(f"{_join(path, str(key))}: unknown key")

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
            self.problems.append(f"{_join(path, key)}: {exc}")
            return default


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _duration(value: Any) -> float:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration string (use 250ms, 2s, 1m)")
    return parse_duration(value)


def _positive_duration(value: Any) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise ValueError(f"{value!r} must be longer than 0")
    return seconds


def _int(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{value!r} is not an integer")
        if value < minimum:
            raise ValueError(f"{value} must be at least {minimum}")
        return value

    return convert


def _number(low: float, high: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{value!r} is not a number")
        if not low <= value <= high:
            raise ValueError(f"{value} must be between {low:g} and {high:g}")
        return float(value)

    return convert


def _log_format(value: Any) -> Literal["text", "json"]:
    if value == "text":
        return "text"
    if value == "json":
        return "json"
    raise ValueError(f"{value!r} must be text or json")


def _log_level(value: Any) -> str:
    if value not in ("debug", "info", "warning", "error"):
        raise ValueError(f"{value!r} must be debug, info, warning or error")
    return str(value)


def _host_port(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a host:port string")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:50061)")
    return value


def _listen_address(value: Any) -> str:
    if value == "":
        return ""
    return _host_port(value)


def _base_url(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a URL")
    parts = urlsplit(value)
    parts.port  # noqa: B018 -- reading it validates it (ValueError names the bad port)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{value!r} must not carry a query, fragment or credentials")
    return value.rstrip("/")


def _read_server(reader: _Reader, raw: Any) -> ServerConfig:
    section = reader.section(raw, "server")
    d = ServerConfig()
    reader.unknown(section, set(ServerConfig.__slots__), "server")
    server = ServerConfig(
        address=reader.value(section, "address", "server", _host_port, d.address),
        metrics_address=reader.value(
            section, "metrics_address", "server", _listen_address, d.metrics_address
        ),
        workers=reader.value(section, "workers", "server", _int(1), d.workers),
        max_targets=reader.value(section, "max_targets", "server", _int(1), d.max_targets),
        max_concurrent_calls=reader.value(
            section, "max_concurrent_calls", "server", _int(1), d.max_concurrent_calls
        ),
        default_deadline=reader.value(
            section, "default_deadline", "server", _positive_duration, d.default_deadline
        ),
        max_deadline=reader.value(
            section, "max_deadline", "server", _positive_duration, d.max_deadline
        ),
        deadline_margin=reader.value(
            section, "deadline_margin", "server", _duration, d.deadline_margin
        ),
        deadline_margin_ratio=reader.value(
            section, "deadline_margin_ratio", "server", _number(0, 0.5), d.deadline_margin_ratio
        ),
        shutdown_grace=reader.value(
            section, "shutdown_grace", "server", _duration, d.shutdown_grace
        ),
        log_format=reader.value(section, "log_format", "server", _log_format, d.log_format),
        log_level=reader.value(section, "log_level", "server", _log_level, d.log_level),
    )
    if server.default_deadline > server.max_deadline:
        reader.problems.append(
            "server.default_deadline: must not be longer than server.max_deadline"
        )
    return server


def _grpc_codes(value: Any) -> tuple[str, ...]:
    names = {code.name for code in grpc.StatusCode} - {"OK"}
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{value!r} is not a list of gRPC status code names")
    unknown = [v for v in value if v not in names]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not gRPC status code names (e.g. UNAVAILABLE)")
    return tuple(value)


def _read_retry(reader: _Reader, raw: Any, path: str) -> RetryPolicy:
    section = reader.section(raw, path)
    reader.unknown(section, set(RetryPolicy.__slots__), path)
    d = RetryPolicy()
    policy = RetryPolicy(
        attempts=reader.value(section, "attempts", path, _int(1), d.attempts),
        backoff=reader.value(section, "backoff", path, _positive_duration, d.backoff),
        max_backoff=reader.value(section, "max_backoff", path, _positive_duration, d.max_backoff),
        budget=reader.value(section, "budget", path, _number(0, 1), d.budget),
        min_retries_per_second=reader.value(
            section, "min_retries_per_second", path, _number(0, 1e6), d.min_retries_per_second
        ),
        grpc_codes=reader.value(section, "grpc_codes", path, _grpc_codes, d.grpc_codes),
    )
    if policy.max_backoff < policy.backoff:
        reader.problems.append(f"{path}.max_backoff: must not be shorter than backoff")
    return policy


def _read_hedge(reader: _Reader, raw: Any, path: str) -> HedgePolicy:
    section = reader.section(raw, path)
    reader.unknown(section, {"delay"}, path)
    if "delay" not in section:
        reader.problems.append(f"{path}.delay: required")
    return HedgePolicy(delay=reader.value(section, "delay", path, _positive_duration, 0.05))


def _read_breaker(reader: _Reader, raw: Any, path: str) -> BreakerPolicy:
    section = reader.section(raw, path)
    reader.unknown(section, set(BreakerPolicy.__slots__), path)
    d = BreakerPolicy()
    return BreakerPolicy(
        fail_max=reader.value(section, "fail_max", path, _int(1), d.fail_max),
        reset_timeout=reader.value(
            section, "reset_timeout", path, _positive_duration, d.reset_timeout
        ),
    )


def _read_rate_limit(reader: _Reader, raw: Any, path: str) -> RateLimit:
    section = reader.section(raw, path)
    reader.unknown(section, set(RateLimit.__slots__), path)
    for key in ("rate", "burst"):
        if key not in section:
            reader.problems.append(f"{path}.{key}: required")
    return RateLimit(
        rate=reader.value(section, "rate", path, _number(0.001, 1e9), 1.0),
        burst=reader.value(section, "burst", path, _int(1), 1),
    )


def _read_cache(reader: _Reader, raw: Any, path: str) -> CachePolicy:
    section = reader.section(raw, path)
    reader.unknown(section, set(CachePolicy.__slots__), path)
    if "ttl" not in section:
        reader.problems.append(f"{path}.ttl: required")
    d = CachePolicy(ttl=0.0)
    policy = CachePolicy(
        ttl=reader.value(section, "ttl", path, _positive_duration, 1.0),
        stale_if_error=reader.value(section, "stale_if_error", path, _duration, d.stale_if_error),
        max_entries=reader.value(section, "max_entries", path, _int(1), d.max_entries),
        max_bytes=reader.value(section, "max_bytes", path, _int(1), d.max_bytes),
        backend=reader.value(section, "backend", path, _cache_backend, d.backend),
        redis_url=reader.value(section, "redis_url", path, _redis_url, d.redis_url),
    )
    if policy.backend == "redis" and not policy.redis_url:
        reader.problems.append(f"{path}.redis_url: required when backend is redis")
    return policy


def _cache_backend(value: Any) -> Literal["memory", "redis"]:
    if value == "memory":
        return "memory"
    if value == "redis":
        return "redis"
    raise ValueError(f"{value!r} must be memory or redis")


def _redis_url(value: Any) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{value!r} is not a redis:// or rediss:// URL")
    return value


_POLICIES: dict[str, Callable[[_Reader, Any, str], Any]] = {
    "retry": _read_retry,
    "hedge": _read_hedge,
    "circuit_breaker": _read_breaker,
    "rate_limit": _read_rate_limit,
    "cache": _read_cache,
}


def _read_upstream(reader: _Reader, name: str, raw: Any) -> UpstreamConfig | None:
    path = f"upstreams.{name}"
    if not _UPSTREAM_NAME.match(name):
        reader.problems.append(f"{path}: upstream names must match [A-Za-z0-9_.-]{{1,64}}")
    section = reader.section(raw, path)
    reader.unknown(section, set(UpstreamConfig.__slots__) - {"name"}, path)
    kind = section.get("kind")
    if kind not in ("http", "grpc"):
        reader.problems.append(f"{path}.kind: must be http or grpc, got {kind!r}")
        return None
    endpoint_key, other_key = ("url", "address") if kind == "http" else ("address", "url")
    if endpoint_key not in section:
        reader.problems.append(f"{path}.{endpoint_key}: required for kind {kind}")
    if other_key in section:
        reader.problems.append(f"{path}.{other_key}: not used by kind {kind}")
    d = UpstreamConfig(name=name, kind=kind)
    policies = {
        key: read(reader, section[key], f"{path}.{key}")
        for key, read in _POLICIES.items()
        if section.get(key) is not None
    }
    return UpstreamConfig(
        name=name,
        kind=kind,
        url=reader.value(section, "url", path, _base_url, "") if kind == "http" else "",
        address=reader.value(section, "address", path, _host_port, "") if kind == "grpc" else "",
        timeout=reader.value(section, "timeout", path, _positive_duration, d.timeout),
        connect_timeout=reader.value(
            section, "connect_timeout", path, _positive_duration, d.connect_timeout
        ),
        max_concurrency=reader.value(section, "max_concurrency", path, _int(1), d.max_concurrency),
        **policies,
    )


def config_from_mapping(raw: Any) -> Config:
    """Builds a Config from parsed YAML; raises ConfigError listing every problem."""
    reader = _Reader()
    top = reader.section(raw, "(top level)")
    reader.unknown(top, {"server", "upstreams"}, "")
    server = _read_server(reader, top.get("server"))
    upstreams: dict[str, UpstreamConfig] = {}
    for name, section in reader.section(top.get("upstreams"), "upstreams").items():
        upstream = _read_upstream(reader, str(name), section)
        if upstream is not None:
            upstreams[str(name)] = upstream
    if reader.problems:
        raise ConfigError(reader.problems)
    return Config(server=server, upstreams=upstreams)


def load_config(path: str | Path) -> Config:
    """Reads and validates the YAML file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text ({exc.reason})"]) from exc
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}".replace("\n", " ")]) from exc
    return config_from_mapping(raw)
