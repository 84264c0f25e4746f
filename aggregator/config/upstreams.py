"""Reading ``server`` and ``upstreams.<name>``: their keys come from the declarations in
config/schema.py; what is written here is only what one key cannot say alone (a key that
depends on ``kind``, the list form of url, ``max_concurrency: auto``) and the cross-checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from aggregator.config import convert as to
from aggregator.config.files import key_pair_problem
from aggregator.config.reader import Reader, key_label, keys_of
from aggregator.config.schema import (
    BreakerPolicy,
    CachePolicy,
    HedgePolicy,
    OutlierDetection,
    RetryPolicy,
    ServerConfig,
    ServerTls,
    UpstreamConfig,
    UpstreamRateLimit,
    UpstreamTls,
)
from aggregator.hosts import bare_host, is_loopback
from aggregator.vocabulary import NAME

# Read apart from the other keys of an upstream: the fleet's (docs/fleet.md) and the policies.
_FLEET = ("url", "address", "resolve_interval", "balancer", "adaptive_max", "max_concurrency")
_KINDS = ("http", "grpc")


def read_server(reader: Reader, raw: Any) -> ServerConfig:
    section = reader.section(raw, "server")
    reader.unknown(section, keys_of(ServerConfig), "server")
    tls = {"tls": lambda raw, path: _read_server_tls(reader, raw, path)}
    server = ServerConfig(**reader.fields(section, ServerConfig, "server", sections=tls))
    if server.default_deadline > server.max_deadline:
        reader.problems.append(
            "server.default_deadline: must not be longer than server.max_deadline"
        )
    admin_host = bare_host(server.admin_address.rpartition(":")[0])
    if server.admin_address and not server.admin_allow_remote and not is_loopback(admin_host):
        reader.problems.append(
            f"server.admin_address: {server.admin_address!r} is not a loopback address; the "
            "admin page shows every upstream and recent aggregate without authentication: "
            "set server.admin_allow_remote: true to serve it beyond this host"
        )
    return server


def _read_server_tls(reader: Reader, raw: Any, path: str) -> ServerTls:
    tls, _ = reader.simple_section(raw, ServerTls, path)
    _check_key_pair(reader, tls.cert, tls.key, path)
    return tls


def _check_key_pair(reader: Reader, cert: str, key: str, path: str) -> None:
    problem = key_pair_problem(cert, key)
    if problem:
        reader.problems.append(f"{path}.key: {problem}")


def _read_retry(reader: Reader, raw: Any, path: str) -> RetryPolicy:
    policy, _ = reader.simple_section(raw, RetryPolicy, path)
    if policy.max_backoff < policy.backoff:
        reader.problems.append(f"{path}.max_backoff: must not be shorter than backoff")
    return policy


def _read_cache(reader: Reader, raw: Any, path: str) -> CachePolicy:
    policy, _ = reader.simple_section(raw, CachePolicy, path)
    if policy.backend == "redis" and not policy.redis_url:
        reader.problems.append(f"{path}.redis_url: required when backend is redis")
    return policy


def _read_upstream_tls(reader: Reader, raw: Any, path: str) -> UpstreamTls:
    tls, section = reader.simple_section(raw, UpstreamTls, path)
    if ("cert" in section) != ("key" in section):
        reader.problems.append(f"{path}: cert and key go together")
    _check_key_pair(reader, tls.cert, tls.key, path)
    return tls


def _simple(cls: type) -> Callable[[Reader, Any, str], Any]:
    def read(reader: Reader, raw: Any, path: str) -> Any:
        return reader.simple_section(raw, cls, path)[0]

    return read


# The policy sections of an upstream, in the order their problems are listed.
_POLICIES: dict[str, Callable[[Reader, Any, str], Any]] = {
    "retry": _read_retry,
    "hedge": _simple(HedgePolicy),
    "circuit_breaker": _simple(BreakerPolicy),
    "rate_limit": _simple(UpstreamRateLimit),
    "cache": _read_cache,
    "tls": _read_upstream_tls,
}


def read_upstream(reader: Reader, name: str, raw: Any) -> UpstreamConfig | None:
    """The upstream, or None when its kind is missing or unknown (nothing else can be read)."""
    path = f"upstreams.{key_label(name)}"
    if not NAME.match(name):
        reader.problems.append(f"{path}: upstream names must match [A-Za-z0-9_.-]{{1,64}}")
    section = reader.section(raw, path)
    reader.unknown(section, keys_of(UpstreamConfig), path)
    kind = section.get("kind")
    if kind not in _KINDS:
        reader.problems.append(f"{path}.kind: must be http or grpc, got {kind!r}")
        return None
    _check_kind_keys(reader, section, path, kind)
    policies = {
        key: read(reader, section[key], f"{path}.{key}")
        for key, read in _POLICIES.items()
        if section.get(key) is not None
    }
    _check_unused_keys(reader, section, path, kind)
    fleet = _read_fleet(reader, section, path, kind)
    skip = {*_FLEET, *(() if kind == "grpc" else ("descriptors",))}
    values = reader.fields(section, UpstreamConfig, path, skip=skip, variant=kind)
    upstream = UpstreamConfig(name=name, kind=kind, **fleet, **values, **policies)
    if upstream.tls is not None and upstream.url.startswith("http://"):
        reader.problems.append(f"{path}.tls: needs an https:// url")
    return upstream


def _check_kind_keys(reader: Reader, section: dict[str, Any], path: str, kind: str) -> None:
    endpoint_key, other_key = ("url", "address") if kind == "http" else ("address", "url")
    if endpoint_key not in section:
        reader.problems.append(f"{path}.{endpoint_key}: required for kind {kind}")
    if other_key in section:
        reader.problems.append(f"{path}.{other_key}: not used by kind {kind}")


def _check_unused_keys(reader: Reader, section: dict[str, Any], path: str, kind: str) -> None:
    if kind == "grpc" and "path_prefixes" in section:
        reader.problems.append(f"{path}.path_prefixes: not used by kind grpc")
    if kind == "http" and "descriptors" in section:
        reader.problems.append(f"{path}.descriptors: not used by kind http")


def _read_fleet(reader: Reader, section: dict[str, Any], path: str, kind: str) -> dict[str, Any]:
    """The keys of docs/fleet.md: endpoints, resolution, balancing, ejection, adaptive limit."""
    key = "url" if kind == "http" else "address"
    endpoints: tuple[str, ...] = reader.field(section, UpstreamConfig, key, path) or ()
    if kind == "http" and len(endpoints) > 1:
        try:
            to.same_origin_shape(endpoints)
        except ValueError as exc:
            reader.problems.append(f"{path}.url: {exc}")
    default = UpstreamConfig(name="", kind="http").max_concurrency
    limit: int | Literal["auto"] = reader.field(section, UpstreamConfig, "max_concurrency", path)
    adaptive_max: int = reader.field(section, UpstreamConfig, "adaptive_max", path)
    outlier = section.get("outlier_detection")
    return {
        key: endpoints[0] if endpoints else "",
        "endpoints": endpoints,
        "resolve_interval": reader.field(section, UpstreamConfig, "resolve_interval", path),
        "balancer": reader.field(section, UpstreamConfig, "balancer", path),
        "outlier_detection": reader.simple_section(
            outlier, OutlierDetection, f"{path}.outlier_detection"
        )[0]
        if outlier is not None
        else OutlierDetection(),
        "max_concurrency": min(default, adaptive_max) if limit == "auto" else limit,
        "adaptive_concurrency": limit == "auto",
        "adaptive_max": adaptive_max,
    }
