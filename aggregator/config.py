"""The service's configuration: one YAML file, validated once at start.

Every problem is reported at once, one line each, naming its key path::

    upstreams.catalog.retry.backoff: "10 sec" is not a duration (use 250ms, 2s, 1m)

The result is a tree of frozen dataclasses passed explicitly to whatever needs it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import grpc
import yaml

from aggregator.schema import load_descriptor_set
from aggregator.security import pem
from aggregator.security.fields import canonical_header, steering
from aggregator.vocabulary import (
    AD_HOC,
    CONTROL_OR_SPACE,
    FRAMING_HEADERS,
    GRPC_METHOD_PATTERN,
    HTTP_METHODS,
    METADATA_KEY,
    NAME,
    PARAM_NAME,
    TOKEN,
    UNFORWARDABLE,
)

T = TypeVar("T")
C = TypeVar("C", bound=str)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*\Z")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_LONGEST = 366 * 24 * 3600.0  # no duration here is meant to be longer; "9" * 400 is a typo
_JWT_ALGORITHMS = frozenset(
    {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
     "ES256", "ES384", "ES512", "EdDSA"}
)  # fmt: skip
MIB = 1024 * 1024


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
    seconds = float(match.group(1)) * _SCALE[match.group(2)]
    if not math.isfinite(seconds) or seconds > _LONGEST:
        raise ValueError(f"{text!r} is longer than a year")
    return seconds


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
    # Keeps this deployment's entries apart in a Redis that other deployments share.
    key_prefix: str = ""


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """TLS to an upstream. Files are re-read when they change (see security/tls.py)."""

    ca: str = ""  # CA bundle to verify the upstream; empty: the system's (http), grpc's (grpc)
    cert: str = ""  # client certificate chain, for upstreams that require mTLS
    key: str = ""


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """When an endpoint of an upstream is taken out of its balancing (SPEC §12)."""

    consecutive_failures: int = 5
    base_ejection_time: float = 30.0  # times the number of ejections, capped at MAX_EJECTION_TIME
    max_ejection_percent: int = 50  # but one endpoint of two or more may always be ejected


BALANCERS: tuple[Literal["least_request", "round_robin"], ...] = ("least_request", "round_robin")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    kind: Literal["http", "grpc"]
    url: str = ""  # http: the first entry of ``url`` (all of them: ``endpoints``)
    address: str = ""  # grpc: the first entry of ``address``
    # Every entry of url (http) or address (grpc): each address each one resolves to is an
    # endpoint of the upstream (SPEC §12). Not a config key: read from url / address.
    endpoints: tuple[str, ...] = ()
    resolve_interval: float = 30.0
    balancer: Literal["least_request", "round_robin"] = "least_request"
    outlier_detection: OutlierDetection = OutlierDetection()
    # max_concurrency: auto. Not a config key: the limit adapts, starting at max_concurrency's
    # default, bounded by 1 and adaptive_max.
    adaptive_concurrency: bool = False
    adaptive_max: int = 1000
    timeout: float = 2.0
    connect_timeout: float = 0.5
    max_concurrency: int = 100
    retry: RetryPolicy | None = None
    hedge: HedgePolicy | None = None
    circuit_breaker: BreakerPolicy | None = None
    rate_limit: RateLimit | None = None
    cache: CachePolicy | None = None
    tls: UpstreamTls | None = None  # grpc: TLS on when set; http: https:// URLs use TLS
    # Caller metadata keys copied to this upstream (HTTP headers / gRPC metadata), e.g.
    # authorization for token propagation. Nothing is forwarded unless named here.
    forward_headers: tuple[str, ...] = ()
    # http: HTTP methods; grpc: /pkg.Service/Method or /pkg.Service/*. Empty: any.
    allowed_methods: tuple[str, ...] = ()
    path_prefixes: tuple[str, ...] = ()  # http: paths must start with one of these. Empty: any.
    max_request_bytes: int = MIB  # a request body (http) or request message (grpc)
    max_response_bytes: int = MIB  # read from a response before giving up
    # http: the upstream reads every request body, whatever it answers: a request with a body
    # may keep its connection alive (otherwise it goes with Connection: close).
    reads_request_bodies: bool = False
    max_headers: int = 64  # request headers or metadata entries, forwarded ones included
    max_header_bytes: int = 16 * 1024  # their names and values together
    # Identity, method-override and URL-rewrite headers (X-Forwarded-For, X-HTTP-Method-Override,
    # X-Original-URL...) callers may set for this upstream; every other one is refused.
    allowed_headers: tuple[str, ...] = ()
    # grpc: where the upstream's message types come from, for JSON requests and answers:
    # "reflection" (its own server reflection) or the path of a FileDescriptorSet file.
    descriptors: str = "reflection"


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert: str
    key: str
    client_ca: str = ""  # when set, callers must present a certificate this CA signed


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
    # auto: uvloop when it is installed (it is a dependency on Linux and macOS), else asyncio.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    tls: ServerTls | None = None
    health_address: str = ""  # a plaintext port serving only grpc.health.v1 (for probes)
    max_request_bytes: int = 4 * MIB  # an incoming AggregateRequest message
    max_upstream_inflight: int = 1000  # upstream attempts in flight, all upstreams together
    # JSON bodies one call may decode (decode_json and Collect's merged, all targets together)
    max_decoded_bytes: int = 8 * MIB
    # An HTTP path, an HTTP query (names and values together) or a gRPC method name, in bytes.
    max_path_bytes: int = 8 * 1024
    # False: AggregateRequest.targets is refused (PERMISSION_DENIED); only named aggregates run.
    allow_ad_hoc: bool = True
    # The admin page (SPEC §13): loopback by default; "" disables. The last admin_recent
    # aggregates are kept for it.
    admin_address: str = "127.0.0.1:9465"
    admin_recent: int = 500


@dataclass(frozen=True, slots=True)
class JwtConfig:
    issuer: str
    audience: str
    keys: tuple[str, ...] = ()  # files: PEM public keys or JWKS documents
    secret_file: str = ""  # file holding a shared secret, for HS* algorithms
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway: float = 30.0  # clock skew tolerated on exp, nbf and iat
    subject_claim: str = "sub"


@dataclass(frozen=True, slots=True)
class CallerConfig:
    name: str
    certificate: str = ""  # a subject alternative name or the subject CN of its certificate
    token_subject: str = ""  # the subject claim of its bearer token
    upstreams: tuple[str, ...] = ()  # the upstreams it may call; "*" for all
    aggregates: tuple[str, ...] = ()  # the named aggregates it may run; "*" for all


@dataclass(frozen=True, slots=True)
class AuthConfig:
    jwt: JwtConfig | None = None
    callers: Mapping[str, CallerConfig] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ParamConfig:
    """A parameter of a named aggregate: required, or optional with a default."""

    name: str
    required: bool = True
    default: Any = None  # a JSON value (str, number, bool, list, dict); None when required


@dataclass(frozen=True, slots=True)
class AggregateConfig:
    """A named aggregate (``aggregates.<name>``); aggregates.py plans its targets."""

    name: str
    description: str = ""
    params: Mapping[str, ParamConfig] = field(default_factory=dict)
    # The targets in their proto3 JSON mapping, as written (parsed into pb.Target when planned).
    targets: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    auth: AuthConfig | None = None  # None: every caller may call every upstream
    tracing: TracingConfig | None = None  # None: off
    aggregates: Mapping[str, AggregateConfig] = field(default_factory=dict)
    # What is allowed but probably a mistake (an unused parameter): logged at start and
    # printed by check-config, one line each, naming its key path.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry tracing (needs the ``otel`` extra)."""

    exporter: Literal["otlp", "console"] = "otlp"
    endpoint: str = ""  # OTLP/gRPC collector; empty: the exporter's default (localhost:4317)
    service_name: str = "aggregator"
    sample_ratio: float = 1.0  # of traces the caller did not already sample


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

    def required(self, raw: Mapping[str, Any], keys: tuple[str, ...], path: str) -> None:
        for key in keys:
            if key not in raw:
                self.problems.append(f"{_join(path, key)}: required")

    def unknown(self, raw: Mapping[str, Any], known: set[str], path: str) -> None:
        for key in raw:
            if key not in known:
                self.problems.append(f"{_join(path, key_label(key))}: unknown key")

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


def key_label(key: Any) -> str:
    """A key as it may appear in a one-line problem: as written, or quoted (repr) when it
    holds a line break, which would split the problem in two."""
    text = str(key)
    return text if text.splitlines() in ([text], []) else repr(text)


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


def _int_between(low: int, high: int) -> Callable[[Any], int]:
    at_least = _int(low)

    def convert(value: Any) -> int:
        if at_least(value) > high:
            raise ValueError(f"{value} must be at most {high}")
        return int(value)

    return convert


def _number(low: float, high: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{value!r} is not a number")
        if not low <= value <= high:
            raise ValueError(f"{value} must be between {low:g} and {high:g}")
        return float(value)

    return convert


def _choice(*choices: C) -> Callable[[Any], C]:
    """A converter accepting exactly one of ``choices``."""

    def convert(value: Any) -> C:
        for choice in choices:
            if value == choice:
                return choice
        raise ValueError(f"{value!r} must be {' or '.join(choices)}")

    return convert


LOG_FORMATS: tuple[Literal["text", "json"], ...] = ("text", "json")
EVENT_LOOPS: tuple[Literal["auto", "asyncio", "uvloop"], ...] = ("auto", "asyncio", "uvloop")
CACHE_BACKENDS: tuple[Literal["memory", "redis"], ...] = ("memory", "redis")
TRACE_EXPORTERS: tuple[Literal["otlp", "console"], ...] = ("otlp", "console")


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
    if CONTROL_OR_SPACE.search(value):
        raise ValueError(f"{value!r} contains whitespace or control characters")
    parts = urlsplit(value)
    parts.port  # noqa: B018 -- reading it validates it (ValueError names the bad port)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{value!r} must not carry a query, fragment or credentials")
    return value.rstrip("/")


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{value!r} is not a list of non-empty strings")
    return tuple(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def _file_of(check: Callable[[str], object]) -> Callable[[Any], str]:
    """A converter for a path whose file ``check`` reads (raising ValueError when unusable)."""

    def convert(value: Any) -> str:
        check(_text(value))
        return str(value)

    return convert


_CERT_FILE = _file_of(pem.certificates)
_KEY_FILE = _file_of(pem.private_key)
_SECRET_FILE = _file_of(pem.secret)


def _verification_key_files(value: Any) -> tuple[str, ...]:
    paths = _strings(value)
    for path in paths:
        pem.verification_keys(path)
    return paths


def _check_key_pair(reader: _Reader, cert: str, key: str, path: str) -> None:
    if cert and key:
        try:
            pem.check_key_pair(cert, key)
        except ValueError as exc:
            reader.problems.append(f"{path}.key: {exc}")


def _read_server_tls(reader: _Reader, raw: Any, path: str) -> ServerTls:
    section = reader.section(raw, path)
    reader.unknown(section, set(ServerTls.__slots__), path)
    reader.required(section, ("cert", "key"), path)
    tls = ServerTls(
        cert=reader.value(section, "cert", path, _CERT_FILE, ""),
        key=reader.value(section, "key", path, _KEY_FILE, ""),
        client_ca=reader.value(section, "client_ca", path, _CERT_FILE, ""),
    )
    _check_key_pair(reader, tls.cert, tls.key, path)
    return tls


def _read_server(reader: _Reader, raw: Any) -> ServerConfig:
    section = reader.section(raw, "server")
    d = ServerConfig()
    reader.unknown(section, set(ServerConfig.__slots__), "server")
    tls = section.get("tls")
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
        log_format=reader.value(
            section, "log_format", "server", _choice(*LOG_FORMATS), d.log_format
        ),
        log_level=reader.value(section, "log_level", "server", _log_level, d.log_level),
        event_loop=reader.value(
            section, "event_loop", "server", _choice(*EVENT_LOOPS), d.event_loop
        ),
        tls=_read_server_tls(reader, tls, "server.tls") if tls is not None else None,
        health_address=reader.value(
            section, "health_address", "server", _listen_address, d.health_address
        ),
        max_request_bytes=reader.value(
            section, "max_request_bytes", "server", _int(1024), d.max_request_bytes
        ),
        max_upstream_inflight=reader.value(
            section, "max_upstream_inflight", "server", _int(1), d.max_upstream_inflight
        ),
        max_decoded_bytes=reader.value(
            section, "max_decoded_bytes", "server", _int(0), d.max_decoded_bytes
        ),
        max_path_bytes=reader.value(
            section, "max_path_bytes", "server", _int_between(64, 1024 * 1024), d.max_path_bytes
        ),
        allow_ad_hoc=reader.value(section, "allow_ad_hoc", "server", _bool, d.allow_ad_hoc),
        admin_address=reader.value(
            section, "admin_address", "server", _listen_address, d.admin_address
        ),
        admin_recent=reader.value(
            section, "admin_recent", "server", _int_between(1, 100_000), d.admin_recent
        ),
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
    reader.required(section, ("delay",), path)
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
    reader.required(section, ("rate", "burst"), path)
    return RateLimit(
        rate=reader.value(section, "rate", path, _number(0.001, 1e9), 1.0),
        burst=reader.value(section, "burst", path, _int(1), 1),
    )


def _read_cache(reader: _Reader, raw: Any, path: str) -> CachePolicy:
    section = reader.section(raw, path)
    reader.unknown(section, set(CachePolicy.__slots__), path)
    reader.required(section, ("ttl",), path)
    d = CachePolicy(ttl=0.0)
    policy = CachePolicy(
        ttl=reader.value(section, "ttl", path, _positive_duration, 1.0),
        stale_if_error=reader.value(section, "stale_if_error", path, _duration, d.stale_if_error),
        max_entries=reader.value(section, "max_entries", path, _int(1), d.max_entries),
        max_bytes=reader.value(section, "max_bytes", path, _int(1), d.max_bytes),
        backend=reader.value(section, "backend", path, _choice(*CACHE_BACKENDS), d.backend),
        redis_url=reader.value(section, "redis_url", path, _redis_url, d.redis_url),
        key_prefix=reader.value(section, "key_prefix", path, _key_prefix, d.key_prefix),
    )
    if policy.backend == "redis" and not policy.redis_url:
        reader.problems.append(f"{path}.redis_url: required when backend is redis")
    return policy


def _key_prefix(value: Any) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise ValueError(f"{value!r} is not 1 to 64 of A-Z a-z 0-9 _ . -")
    return value


def _redis_url(value: Any) -> str:
    if not isinstance(value, str) or urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{value!r} is not a redis:// or rediss:// URL")
    return value


def _read_upstream_tls(reader: _Reader, raw: Any, path: str) -> UpstreamTls:
    section = reader.section(raw, path)
    reader.unknown(section, set(UpstreamTls.__slots__), path)
    tls = UpstreamTls(
        ca=reader.value(section, "ca", path, _CERT_FILE, ""),
        cert=reader.value(section, "cert", path, _CERT_FILE, ""),
        key=reader.value(section, "key", path, _KEY_FILE, ""),
    )
    if ("cert" in section) != ("key" in section):
        reader.problems.append(f"{path}: cert and key go together")
    _check_key_pair(reader, tls.cert, tls.key, path)
    return tls


def _forward_headers(value: Any) -> tuple[str, ...]:
    names = tuple(name.lower() for name in _strings(value))
    for name in names:
        if not METADATA_KEY.match(name) or name.endswith("-bin") or name.startswith("grpc-"):
            raise ValueError(f"{name!r} is not a forwardable metadata key ([0-9a-z_.-], no -bin)")
        if name in UNFORWARDABLE:
            raise ValueError(f"{name!r} is a hop-by-hop or reserved header and is never forwarded")
    return names


def _allowed_headers(value: Any) -> tuple[str, ...]:
    names = tuple(name.lower() for name in _strings(value))
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


def _http_methods(value: Any) -> tuple[str, ...]:
    methods = tuple(method.upper() for method in _strings(value))
    unknown = [method for method in methods if method not in HTTP_METHODS]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not one of {', '.join(sorted(HTTP_METHODS))}")
    return methods


def _grpc_methods(value: Any) -> tuple[str, ...]:
    methods = _strings(value)
    for method in methods:
        if not GRPC_METHOD_PATTERN.match(method):
            raise ValueError(f"{method!r} is not /package.Service/Method or /package.Service/*")
    return methods


def _path_prefixes(value: Any) -> tuple[str, ...]:
    prefixes = _strings(value)
    for prefix in prefixes:
        segments = prefix.split("/")
        if not prefix.startswith("/") or re.search(r"[\s?#\\%]", prefix) or ".." in segments:
            raise ValueError(f"{prefix!r} is not a plain path starting with / (no ?, #, %, ..)")
    return prefixes


def _descriptors(value: Any) -> str:
    """``reflection``, or a FileDescriptorSet file that is read (and its imports resolved) now."""
    if value == "reflection":
        return "reflection"
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} must be reflection or the path of a FileDescriptorSet file")
    load_descriptor_set(value)
    return value


_POLICIES: dict[str, Callable[[_Reader, Any, str], Any]] = {
    "retry": _read_retry,
    "hedge": _read_hedge,
    "circuit_breaker": _read_breaker,
    "rate_limit": _read_rate_limit,
    "cache": _read_cache,
    "tls": _read_upstream_tls,
}


def _read_upstream(reader: _Reader, name: str, raw: Any) -> UpstreamConfig | None:
    path = f"upstreams.{key_label(name)}"
    if not NAME.match(name):
        reader.problems.append(f"{path}: upstream names must match [A-Za-z0-9_.-]{{1,64}}")
    section = reader.section(raw, path)
    reader.unknown(
        section, set(UpstreamConfig.__slots__) - {"name", "endpoints", "adaptive_concurrency"}, path
    )
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
    if kind == "grpc" and "path_prefixes" in section:
        reader.problems.append(f"{path}.path_prefixes: not used by kind grpc")
    if kind == "http" and "descriptors" in section:
        reader.problems.append(f"{path}.descriptors: not used by kind http")
    upstream = UpstreamConfig(
        name=name,
        kind=kind,
        **_read_fleet(reader, section, path, kind),
        timeout=reader.value(section, "timeout", path, _positive_duration, d.timeout),
        connect_timeout=reader.value(
            section, "connect_timeout", path, _positive_duration, d.connect_timeout
        ),
        forward_headers=reader.value(
            section, "forward_headers", path, _forward_headers, d.forward_headers
        ),
        allowed_methods=reader.value(
            section,
            "allowed_methods",
            path,
            _http_methods if kind == "http" else _grpc_methods,
            d.allowed_methods,
        ),
        path_prefixes=reader.value(section, "path_prefixes", path, _path_prefixes, d.path_prefixes),
        max_request_bytes=reader.value(
            section, "max_request_bytes", path, _int(0), d.max_request_bytes
        ),
        max_response_bytes=reader.value(
            section, "max_response_bytes", path, _int(1), d.max_response_bytes
        ),
        max_headers=reader.value(section, "max_headers", path, _int(0), d.max_headers),
        reads_request_bodies=reader.value(
            section, "reads_request_bodies", path, _bool, d.reads_request_bodies
        ),
        max_header_bytes=reader.value(
            section, "max_header_bytes", path, _int(0), d.max_header_bytes
        ),
        allowed_headers=reader.value(
            section, "allowed_headers", path, _allowed_headers, d.allowed_headers
        ),
        descriptors=reader.value(section, "descriptors", path, _descriptors, d.descriptors)
        if kind == "grpc"
        else d.descriptors,
        **policies,
    )
    if upstream.tls is not None and upstream.url.startswith("http://"):
        reader.problems.append(f"{path}.tls: needs an https:// url")
    return upstream


def _endpoints(convert: Callable[[Any], str]) -> Callable[[Any], tuple[str, ...]]:
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


def _same_origin_shape(urls: tuple[str, ...]) -> None:
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


def _read_outlier(reader: _Reader, raw: Any, path: str) -> OutlierDetection:
    section = reader.section(raw, path)
    reader.unknown(section, set(OutlierDetection.__slots__), path)
    d = OutlierDetection()
    return OutlierDetection(
        consecutive_failures=reader.value(
            section, "consecutive_failures", path, _int(1), d.consecutive_failures
        ),
        base_ejection_time=reader.value(
            section, "base_ejection_time", path, _positive_duration, d.base_ejection_time
        ),
        max_ejection_percent=reader.value(
            section, "max_ejection_percent", path, _int_between(0, 100), d.max_ejection_percent
        ),
    )


def _max_concurrency(value: Any) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    try:
        return _int(1)(value)
    except ValueError:
        raise ValueError(f"{value!r} is not auto nor an integer of at least 1") from None


def _read_fleet(reader: _Reader, section: dict[str, Any], path: str, kind: str) -> dict[str, Any]:
    """The keys of SPEC §12: endpoints, resolution, balancing, ejection, adaptive limit."""
    key, convert = ("url", _base_url) if kind == "http" else ("address", _host_port)
    none: tuple[str, ...] = ()
    endpoints = reader.value(section, key, path, _endpoints(convert), none)
    if kind == "http" and len(endpoints) > 1:
        try:
            _same_origin_shape(endpoints)
        except ValueError as exc:
            reader.problems.append(f"{path}.url: {exc}")
    d = UpstreamConfig(name="", kind="http")
    limit: int | Literal["auto"] = reader.value(
        section, "max_concurrency", path, _max_concurrency, d.max_concurrency
    )
    adaptive_max = reader.value(section, "adaptive_max", path, _int(1), d.adaptive_max)
    outlier = section.get("outlier_detection")
    return {
        key: endpoints[0] if endpoints else "",
        "endpoints": endpoints,
        "resolve_interval": reader.value(
            section, "resolve_interval", path, _positive_duration, d.resolve_interval
        ),
        "balancer": reader.value(section, "balancer", path, _choice(*BALANCERS), d.balancer),
        "outlier_detection": _read_outlier(reader, outlier, f"{path}.outlier_detection")
        if outlier is not None
        else d.outlier_detection,
        "max_concurrency": min(d.max_concurrency, adaptive_max) if limit == "auto" else limit,
        "adaptive_concurrency": limit == "auto",
        "adaptive_max": adaptive_max,
    }


def _jwt_algorithms(value: Any) -> tuple[str, ...]:
    algorithms = _strings(value)
    unknown = [name for name in algorithms if name not in _JWT_ALGORITHMS]
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: not one of {', '.join(sorted(_JWT_ALGORITHMS))} "
            '("none" is never accepted)'
        )
    return algorithms


def _read_jwt(reader: _Reader, raw: Any, path: str) -> JwtConfig:
    section = reader.section(raw, path)
    reader.unknown(section, set(JwtConfig.__slots__), path)
    for key in ("issuer", "audience"):
        if key not in section:
            reader.problems.append(f"{path}.{key}: required (tokens are checked against it)")
    d = JwtConfig(issuer="", audience="")
    jwt = JwtConfig(
        issuer=reader.value(section, "issuer", path, _text, ""),
        audience=reader.value(section, "audience", path, _text, ""),
        keys=reader.value(section, "keys", path, _verification_key_files, d.keys),
        secret_file=reader.value(section, "secret_file", path, _SECRET_FILE, d.secret_file),
        algorithms=reader.value(section, "algorithms", path, _jwt_algorithms, d.algorithms),
        leeway=reader.value(section, "leeway", path, _duration, d.leeway),
        subject_claim=reader.value(section, "subject_claim", path, _text, d.subject_claim),
    )
    hmac = any(name.startswith("HS") for name in jwt.algorithms)
    if hmac and "secret_file" not in section:
        reader.problems.append(f"{path}.secret_file: required by the HS* algorithms")
    if not all(name.startswith("HS") for name in jwt.algorithms) and "keys" not in section:
        reader.problems.append(f"{path}.keys: required by the public-key algorithms")
    return jwt


def _read_caller(
    reader: _Reader,
    name: str,
    raw: Any,
    upstreams: Collection[str],
    aggregates: Collection[str],
    path: str,
) -> CallerConfig:
    section = reader.section(raw, path)
    reader.unknown(section, set(CallerConfig.__slots__) - {"name"}, path)
    if "certificate" not in section and "token_subject" not in section:
        reader.problems.append(f"{path}: needs a certificate or a token_subject to be known by")
    if "upstreams" not in section and "aggregates" not in section:
        reader.problems.append(f'{path}.upstreams: required (a list of upstream names, or "*")')
    caller = CallerConfig(
        name=name,
        certificate=reader.value(section, "certificate", path, _text, ""),
        token_subject=reader.value(section, "token_subject", path, _text, ""),
        upstreams=reader.value(section, "upstreams", path, _strings, ()),
        aggregates=reader.value(section, "aggregates", path, _strings, ()),
    )
    for upstream in caller.upstreams:
        if upstream != "*" and upstream not in upstreams:
            reader.problems.append(f"{path}.upstreams: {upstream!r} is not a configured upstream")
    for aggregate in caller.aggregates:
        if aggregate != "*" and aggregate not in aggregates:
            reader.problems.append(
                f"{path}.aggregates: {aggregate!r} is not a configured aggregate"
            )
    return caller


def _read_auth(
    reader: _Reader,
    raw: Any,
    upstreams: Collection[str],
    aggregates: Collection[str],
    server: ServerConfig,
) -> AuthConfig:
    section = reader.section(raw, "auth")
    reader.unknown(section, {"jwt", "callers"}, "auth")
    jwt = _read_jwt(reader, section["jwt"], "auth.jwt") if section.get("jwt") else None
    callers = {
        str(name): _read_caller(
            reader,
            str(name),
            raw_caller,
            upstreams,
            aggregates,
            f"auth.callers.{key_label(name)}",
        )
        for name, raw_caller in reader.section(section.get("callers"), "auth.callers").items()
    }
    if not callers:
        reader.problems.append("auth.callers: at least one caller is required")
    _check_identities(reader, callers, jwt, server)
    return AuthConfig(jwt=jwt, callers=callers)


def _check_identities(
    reader: _Reader,
    callers: Mapping[str, CallerConfig],
    jwt: JwtConfig | None,
    server: ServerConfig,
) -> None:
    """Each way of knowing a caller must be switched on, and name one caller only."""
    seen: dict[tuple[str, str], str] = {}
    for caller in callers.values():
        path = f"auth.callers.{caller.name}"
        if caller.certificate and (server.tls is None or not server.tls.client_ca):
            reader.problems.append(
                f"{path}.certificate: needs server.tls.client_ca (no client certificates otherwise)"
            )
        if caller.token_subject and jwt is None:
            reader.problems.append(f"{path}.token_subject: needs auth.jwt")
        identities = (("certificate", caller.certificate), ("token", caller.token_subject))
        for kind, identity in identities:
            if identity and (kind, identity) in seen:
                reader.problems.append(
                    f"{path}: {kind} {identity!r} is also auth.callers.{seen[kind, identity]}"
                )
            seen.setdefault((kind, identity), caller.name)


def config_from_mapping(raw: Any) -> Config:
    """Builds a Config from parsed YAML; raises ConfigError listing every problem."""
    reader = _Reader()
    top = reader.section(raw, "(top level)")
    reader.unknown(top, {"server", "upstreams", "auth", "tracing", "aggregates"}, "")
    server = _read_server(reader, top.get("server"))
    upstreams: dict[str, UpstreamConfig] = {}
    for name, section in reader.section(top.get("upstreams"), "upstreams").items():
        upstream = _read_upstream(reader, str(name), section)
        if upstream is not None:
            upstreams[str(name)] = upstream
    aggregates = {
        str(name): _read_aggregate(reader, str(name), section)
        for name, section in reader.section(top.get("aggregates"), "aggregates").items()
    }
    auth = top.get("auth")
    auth_config = (
        _read_auth(reader, auth, upstreams, aggregates, server) if auth is not None else None
    )
    tracing = top.get("tracing")
    tracing_config = _read_tracing(reader, tracing) if tracing is not None else None
    config = Config(
        server=server,
        upstreams=upstreams,
        auth=auth_config,
        tracing=tracing_config,
        aggregates=aggregates,
    )
    warnings: tuple[str, ...] = ()
    if aggregates:
        # Every named aggregate is planned now, as a request naming its targets would be.
        from aggregator.aggregates import Catalog  # plan.py imports this module

        try:
            warnings = Catalog(config).warnings
        except ConfigError as exc:
            reader.problems.extend(exc.problems)
    if reader.problems:
        raise ConfigError(reader.problems)
    return replace(config, warnings=warnings) if warnings else config


def _read_aggregate(reader: _Reader, name: str, raw: Any) -> AggregateConfig:
    path = f"aggregates.{key_label(name)}"
    if not NAME.match(name):
        reader.problems.append(f"{path}: aggregate names must match [A-Za-z0-9_.-]{{1,64}}")
    elif name == AD_HOC:
        reader.problems.append(f"{path}: {AD_HOC!r} is the metric label of ad-hoc calls")
    section = reader.section(raw, path)
    reader.unknown(section, {"description", "params", "targets"}, path)
    targets = section.get("targets")
    if not isinstance(targets, list) or not targets:
        reader.problems.append(f"{path}.targets: required (a list of targets)")
        targets = []
    checked: list[Mapping[str, Any]] = []
    for index, target in enumerate(targets):
        if isinstance(target, dict):
            checked.append(target)
        else:
            reader.problems.append(
                f"{path}.targets[{index}]: must be a mapping, got {_kind(target)}"
            )
    params = {
        str(key): _read_param(reader, str(key), value, f"{path}.params.{key_label(key)}")
        for key, value in reader.section(section.get("params"), f"{path}.params").items()
    }
    return AggregateConfig(
        name=name,
        description=reader.value(section, "description", path, _description, ""),
        params=params,
        targets=tuple(checked),
    )


def _description(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _read_param(reader: _Reader, name: str, raw: Any, path: str) -> ParamConfig:
    if not PARAM_NAME.match(name):
        reader.problems.append(f"{path}: parameter names must match [A-Za-z0-9_-]{{1,64}}")
    section = reader.section(raw, path)
    reader.unknown(section, {"required", "default"}, path)
    has_default = "default" in section
    required = reader.value(section, "required", path, _bool, not has_default)
    default = section.get("default")
    if required and has_default:
        reader.problems.append(f"{path}.default: a required parameter has no default")
    elif not required and not has_default:
        reader.problems.append(
            f"{path}.required: false needs a default (a default makes it optional)"
        )
    elif has_default:
        problem = _json_value_problem(default)
        if problem:
            reader.problems.append(f"{path}.default: {problem}")
    return ParamConfig(name=name, required=required, default=default if has_default else None)


def _json_value_problem(value: Any) -> str | None:
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


def _read_tracing(reader: _Reader, raw: Any) -> TracingConfig:
    section = reader.section(raw, "tracing")
    reader.unknown(section, set(TracingConfig.__slots__), "tracing")
    d = TracingConfig()

    def text(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a string")
        return value

    return TracingConfig(
        exporter=reader.value(
            section, "exporter", "tracing", _choice(*TRACE_EXPORTERS), d.exporter
        ),
        endpoint=reader.value(section, "endpoint", "tracing", text, d.endpoint),
        service_name=reader.value(section, "service_name", "tracing", text, d.service_name),
        sample_ratio=reader.value(
            section, "sample_ratio", "tracing", _number(0, 1), d.sample_ratio
        ),
    )


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
    # PyYAML's constructors raise more than YAMLError on input they cannot build: ValueError
    # (a timestamp like 2024-02-31), KeyError (!!bool maybe), TypeError, RecursionError (deep
    # nesting)... Whatever it raises, the file is not usable YAML: say so, on one line.
    except Exception as exc:
        detail = str(exc) if isinstance(exc, yaml.YAMLError) else f"{type(exc).__name__} {exc}"
        raise ConfigError([f"{source}: not valid YAML: {detail}".replace("\n", " ")]) from exc
    return config_from_mapping(raw)
