"""The configuration's shape: a tree of frozen dataclasses, each key declared once.

A key's field carries its default and its converter (``setting``), or, for a key a document
must give, its converter and the stand-in used while the rest is checked (``required``). The
reader (config/sections.py) walks these declarations, and tests/project/test_docs.py checks
docs/configuration.md against them; neither spells a key again. Fields the reader fills in
itself (a mapping entry's name, the list form of url) are marked ``derived``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from aggregator.config import convert as to
from aggregator.config import files

T = TypeVar("T")
MIB = 1024 * 1024

BALANCERS: tuple[Literal["least_request", "round_robin"], ...] = ("least_request", "round_robin")
LOG_FORMATS: tuple[Literal["text", "json"], ...] = ("text", "json")
EVENT_LOOPS: tuple[Literal["auto", "asyncio", "uvloop"], ...] = ("auto", "asyncio", "uvloop")
CACHE_BACKENDS: tuple[Literal["memory", "redis"], ...] = ("memory", "redis")
TRACE_EXPORTERS: tuple[Literal["otlp", "console"], ...] = ("otlp", "console")
LIMIT_BACKENDS: tuple[Literal["memory", "redis"], ...] = ("memory", "redis")
ON_BACKEND_ERROR: tuple[Literal["local", "allow", "deny"], ...] = ("local", "allow", "deny")
RATE_LIMIT_SCOPES: tuple[Literal["local", "global"], ...] = ("local", "global")


def setting(default: T, convert: Callable[[Any], Any], **variants: Callable[[Any], Any]) -> T:
    """A key with its default and converter; ``variants`` convert it for one upstream kind."""
    metadata = {"convert": convert, **{f"convert_{kind}": c for kind, c in variants.items()}}
    return field(default=default, metadata=metadata)


def required(convert: Callable[[Any], Any], fallback: Any) -> dict[str, Any]:
    """The metadata of a key the document must give (``field(metadata=required(...))``, so
    that mypy sees a field without a default); ``fallback`` stands in while the rest is
    checked."""
    return {"convert": convert, "fallback": fallback}


# Not a key: the reader fills the field in.
DERIVED = {"derived": True}


def derived(default: T) -> T:
    """Not a key, with a default: the reader fills it in when it applies."""
    return field(default=default, metadata=DERIVED)


def section(default: Any = None) -> Any:
    """A sub-section, read by its own reader; absent: ``default``."""
    return field(default=default, metadata={"section": True})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = setting(3, to.at_least(1))  # in all, the first included
    backoff: float = setting(0.025, to.positive_duration)
    max_backoff: float = setting(0.25, to.positive_duration)
    # share of the last 10 s of requests that may be retries or hedges
    budget: float = setting(0.2, to.number(0, 1))
    # the budget's floor, so a quiet upstream can retry
    min_retries_per_second: float = setting(3.0, to.number(0, 1e6))
    grpc_codes: tuple[str, ...] = setting(("UNAVAILABLE",), to.grpc_codes)


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    delay: float = field(metadata=required(to.positive_duration, 0.05))


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    fail_max: int = setting(5, to.at_least(1))
    reset_timeout: float = setting(30.0, to.positive_duration)


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float = field(metadata=required(to.number(0.001, 1e9), 1.0))
    burst: int = field(metadata=required(to.at_least(1), 1))


@dataclass(frozen=True, slots=True)
class UpstreamRateLimit(RateLimit):
    # global: held for every replica together in limits.backend (docs/operations.md)
    scope: Literal["local", "global"] = setting("local", to.choice(*RATE_LIMIT_SCOPES))


@dataclass(frozen=True, slots=True)
class CachePolicy:
    ttl: float = field(metadata=required(to.positive_duration, 1.0))
    stale_if_error: float = setting(0.0, to.duration)
    max_entries: int = setting(10_000, to.at_least(1))
    # bodies held in memory; one entry may use an eighth
    max_bytes: int = setting(64 * MIB, to.at_least(1))
    backend: Literal["memory", "redis"] = setting("memory", to.choice(*CACHE_BACKENDS))
    redis_url: str = setting("", to.redis_url)
    # Keeps this deployment's entries apart in a Redis that other deployments share.
    key_prefix: str = setting("", to.key_prefix)


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """TLS to an upstream. Files are re-read when they change (see security/tls.py)."""

    # CA bundle to verify the upstream; empty: the system's (http), grpc's (grpc)
    ca: str = setting("", files.cert_file)
    cert: str = setting("", files.cert_file)  # client certificate chain, for upstreams with mTLS
    key: str = setting("", files.key_file)


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """When an endpoint of an upstream is taken out of its balancing (docs/fleet.md)."""

    consecutive_failures: int = setting(5, to.at_least(1))
    # times the number of ejections, capped at MAX_EJECTION_TIME
    base_ejection_time: float = setting(30.0, to.positive_duration)
    # but one endpoint of two or more may always be ejected
    max_ejection_percent: int = setting(50, to.between(0, 100))


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str = field(metadata=DERIVED)
    kind: Literal["http", "grpc"] = field()  # read first, by hand: other keys depend on it
    # url (http) and address (grpc) are read as lists; each holds the list's first entry.
    url: str = setting("", to.endpoints(to.base_url))
    address: str = setting("", to.endpoints(to.host_port))
    # Every entry of url (http) or address (grpc): each address each one resolves to is an
    # endpoint of the upstream (docs/fleet.md).
    endpoints: tuple[str, ...] = derived(())
    resolve_interval: float = setting(30.0, to.positive_duration)
    balancer: Literal["least_request", "round_robin"] = setting(
        "least_request", to.choice(*BALANCERS)
    )
    outlier_detection: OutlierDetection = section(OutlierDetection())
    # max_concurrency: auto. The limit adapts, starting at max_concurrency's default, bounded
    # by 1 and adaptive_max.
    adaptive_concurrency: bool = derived(False)
    adaptive_max: int = setting(1000, to.at_least(1))
    timeout: float = setting(2.0, to.positive_duration)
    connect_timeout: float = setting(0.5, to.positive_duration)
    max_concurrency: int = setting(100, to.max_concurrency)
    retry: RetryPolicy | None = section()
    hedge: HedgePolicy | None = section()
    circuit_breaker: BreakerPolicy | None = section()
    rate_limit: UpstreamRateLimit | None = section()
    cache: CachePolicy | None = section()
    tls: UpstreamTls | None = section()  # grpc: TLS on when set; http: https:// URLs use TLS
    # Caller metadata keys copied to this upstream (HTTP headers / gRPC metadata), e.g.
    # authorization for token propagation. Nothing is forwarded unless named here.
    forward_headers: tuple[str, ...] = setting((), to.forward_headers)
    # http: HTTP methods; grpc: /pkg.Service/Method or /pkg.Service/*. Empty: any.
    allowed_methods: tuple[str, ...] = setting((), to.http_methods, grpc=to.grpc_methods)
    # http: paths must start with one of these. Empty: any.
    path_prefixes: tuple[str, ...] = setting((), to.path_prefixes)
    # a request body (http) or request message (grpc)
    max_request_bytes: int = setting(MIB, to.at_least(0))
    max_response_bytes: int = setting(MIB, to.at_least(1))  # read from a response at most
    # request headers or metadata entries, forwarded ones included
    # http: the upstream reads every request body, whatever it answers: a request with a body
    # may keep its connection alive (otherwise it goes with Connection: close).
    reads_request_bodies: bool = setting(False, to.boolean)
    max_headers: int = setting(64, to.at_least(0))
    max_header_bytes: int = setting(16 * 1024, to.at_least(0))  # their names and values
    # Identity, method-override and URL-rewrite headers (X-Forwarded-For, X-HTTP-Method-Override,
    # X-Original-URL...) callers may set for this upstream; every other one is refused.
    allowed_headers: tuple[str, ...] = setting((), to.allowed_headers)
    # grpc: where the upstream's message types come from, for JSON requests and answers:
    # "reflection" (its own server reflection) or the path of a FileDescriptorSet file.
    descriptors: str = setting("reflection", files.descriptors)


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert: str = field(metadata=required(files.cert_file, ""))
    key: str = field(metadata=required(files.key_file, ""))
    # when set, callers must present a certificate this CA signed
    client_ca: str = setting("", files.cert_file)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    address: str = setting("[::]:50051", to.host_port)
    metrics_address: str = setting("0.0.0.0:9464", to.listen_address)
    workers: int = setting(1, to.at_least(1))
    max_targets: int = setting(100, to.at_least(1))
    max_concurrent_calls: int = setting(1000, to.at_least(1))
    default_deadline: float = setting(5.0, to.positive_duration)
    max_deadline: float = setting(30.0, to.positive_duration)
    deadline_margin: float = setting(0.020, to.duration)
    deadline_margin_ratio: float = setting(0.05, to.number(0, 0.5))
    shutdown_grace: float = setting(10.0, to.duration)
    # How often the config file is looked at for a change of content, reloaded when it changed
    # (docs/operations.md); "" (0): only on SIGHUP.
    config_check_interval: float = setting(10.0, to.positive_duration_or_off)
    log_format: Literal["text", "json"] = setting("text", to.choice(*LOG_FORMATS))
    log_level: str = setting("info", to.log_level)
    # auto: uvloop when it is installed (it is a dependency on Linux and macOS), else asyncio.
    event_loop: Literal["auto", "asyncio", "uvloop"] = setting("auto", to.choice(*EVENT_LOOPS))
    tls: ServerTls | None = section()
    # a plaintext port serving only grpc.health.v1 (for probes)
    health_address: str = setting("", to.listen_address)
    # an incoming AggregateRequest message
    max_request_bytes: int = setting(4 * MIB, to.at_least(1024))
    # upstream attempts in flight, all upstreams together
    max_upstream_inflight: int = setting(1000, to.at_least(1))
    # JSON bodies one call may decode (decode_json and Collect's merged, all targets together)
    max_decoded_bytes: int = setting(8 * MIB, to.at_least(0))
    # An HTTP path, an HTTP query (names and values together) or a gRPC method name, in bytes.
    max_path_bytes: int = setting(8 * 1024, to.between(64, 1024 * 1024))
    # False: AggregateRequest.targets is refused (PERMISSION_DENIED); only named aggregates run.
    allow_ad_hoc: bool = setting(True, to.boolean)
    # The admin page (docs/admin.md): loopback by default; "" disables. The last admin_recent
    # aggregates are kept for it.
    admin_address: str = setting("127.0.0.1:9465", to.listen_address)
    admin_recent: int = setting(500, to.between(1, 100_000))
    # Host names the admin page answers besides its address and loopback names (else 421).
    admin_hosts: tuple[str, ...] = setting((), to.host_names)
    # A non-loopback admin_address is refused unless this says it is meant (docs/security.md).
    admin_allow_remote: bool = setting(False, to.boolean)


@dataclass(frozen=True, slots=True)
class JwtConfig:
    issuer: str = field(metadata=required(to.text, ""))
    audience: str = field(metadata=required(to.text, ""))
    # files: PEM public keys or JWKS documents
    keys: tuple[str, ...] = setting((), files.verification_key_files)
    # file holding a shared secret, for HS* algorithms
    secret_file: str = setting("", files.secret_file)
    algorithms: tuple[str, ...] = setting(("RS256", "ES256"), to.jwt_algorithms)
    leeway: float = setting(30.0, to.duration)  # clock skew tolerated on exp, nbf and iat
    subject_claim: str = setting("sub", to.text)


@dataclass(frozen=True, slots=True)
class CallerConfig:
    name: str = field(metadata=DERIVED)
    # a subject alternative name or the subject CN of its certificate
    certificate: str = setting("", to.text)
    token_subject: str = setting("", to.text)  # the subject claim of its bearer token
    upstreams: tuple[str, ...] = setting((), to.strings)  # the upstreams it may call; "*": all
    # the named aggregates it may run; "*" for all
    aggregates: tuple[str, ...] = setting((), to.strings)
    # Aggregate + Collect calls a second (all replicas together with limits.backend: redis)
    rate_limit: RateLimit | None = section()
    max_concurrent_calls: int | None = setting(None, to.at_least(1))  # in flight, per process


@dataclass(frozen=True, slots=True)
class AuthConfig:
    jwt: JwtConfig | None = section()
    callers: Mapping[str, CallerConfig] = field(default_factory=dict, metadata={"section": True})


@dataclass(frozen=True, slots=True)
class ParamConfig:
    """A parameter of a named aggregate: required, or optional with a default."""

    name: str = field(metadata=DERIVED)
    required: bool = True
    default: Any = None  # a JSON value (str, number, bool, list, dict); None when required


@dataclass(frozen=True, slots=True)
class AggregateConfig:
    """A named aggregate (``aggregates.<name>``); aggregates.py plans its targets."""

    name: str = field(metadata=DERIVED)
    description: str = setting("", to.string)
    params: Mapping[str, ParamConfig] = field(default_factory=dict, metadata={"section": True})
    # The targets in their proto3 JSON mapping, as written (parsed into pb.Target when planned).
    targets: tuple[Mapping[str, Any], ...] = section(())


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry tracing (needs the ``otel`` extra)."""

    exporter: Literal["otlp", "console"] = setting("otlp", to.choice(*TRACE_EXPORTERS))
    # OTLP/gRPC collector; empty: the exporter's default (localhost:4317)
    endpoint: str = setting("", to.string)
    service_name: str = setting("aggregator", to.string)
    sample_ratio: float = setting(1.0, to.number(0, 1))  # of traces the caller did not sample


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Where rate limits that hold across replicas are kept (docs/operations.md)."""

    backend: Literal["memory", "redis"] = setting("memory", to.choice(*LIMIT_BACKENDS))
    redis_url: str = setting("", to.redis_url)
    key_prefix: str = setting("aggregator", to.key_prefix)
    # when Redis does not answer within timeout: local limits, admit, or refuse
    on_backend_error: Literal["local", "allow", "deny"] = setting(
        "local", to.choice(*ON_BACKEND_ERROR)
    )
    timeout: float = setting(0.005, to.positive_duration)  # one admission's round trip


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig, metadata={"section": True})
    upstreams: Mapping[str, UpstreamConfig] = field(
        default_factory=dict, metadata={"section": True}
    )
    auth: AuthConfig | None = section()  # None: every caller may call every upstream
    tracing: TracingConfig | None = section()  # None: off
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata={"section": True})
    aggregates: Mapping[str, AggregateConfig] = field(
        default_factory=dict, metadata={"section": True}
    )
    # What is allowed but probably a mistake (an unused parameter): logged at start and
    # printed by check-config, one line each, naming its key path.
    warnings: tuple[str, ...] = derived(())
