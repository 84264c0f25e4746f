"""A whole document: the top level, ``auth``, ``aggregates``, ``tracing``, and the cross-checks
between sections. Every problem is collected, then all are raised at once in a ConfigError.

Named aggregates are read here but planned a layer above (aggregator/load.py): planning needs
the planner, and the config sits below it.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aggregator.config import convert as to
from aggregator.config.reader import ConfigError, Reader, key_label, keys_of, kind_of
from aggregator.config.schema import (
    AggregateConfig,
    AuthConfig,
    CallerConfig,
    Config,
    JwtConfig,
    LimitsConfig,
    ParamConfig,
    RateLimit,
    ServerConfig,
    TracingConfig,
    UpstreamConfig,
)
from aggregator.config.upstreams import read_server, read_upstream
from aggregator.vocabulary import AD_HOC, NAME, PARAM_NAME


@dataclass(frozen=True, slots=True)
class Read:
    """A document read, with every problem found (the config is usable only without any)."""

    config: Config
    problems: list[str]
    # Upstreams the document declares but that could not be read (no kind): what names them
    # elsewhere is not a further problem.
    unreadable: frozenset[str]


def read_config(raw: Any) -> Read:
    """Reads parsed YAML into a Config, collecting every problem instead of raising."""
    reader = Reader()
    top = reader.section(raw, "(top level)")
    reader.unknown(top, keys_of(Config), "")
    server = read_server(reader, top.get("server"))
    upstreams: dict[str, UpstreamConfig] = {}
    declared = reader.section(top.get("upstreams"), "upstreams")
    for name, section in declared.items():
        upstream = read_upstream(reader, str(name), section)
        if upstream is not None:
            upstreams[str(name)] = upstream
    aggregates = {
        str(name): _read_aggregate(reader, str(name), section)
        for name, section in reader.section(top.get("aggregates"), "aggregates").items()
    }
    auth = top.get("auth")
    known = {str(name) for name in declared}
    auth_config = _read_auth(reader, auth, known, aggregates, server) if auth is not None else None
    tracing = top.get("tracing")
    tracing_config = (
        reader.simple_section(tracing, TracingConfig, "tracing")[0] if tracing is not None else None
    )
    limits = _read_limits(reader, top.get("limits"))
    config = Config(
        server=server,
        upstreams=upstreams,
        auth=auth_config,
        tracing=tracing_config,
        aggregates=aggregates,
        limits=limits,
    )
    return Read(config, reader.problems, frozenset(known - set(upstreams)))


def config_from_mapping(raw: Any) -> Config:
    """Builds a Config from parsed YAML; raises ConfigError listing every problem.

    Named aggregates are checked for shape only; aggregator/load.py plans them."""
    read = read_config(raw)
    if read.problems:
        raise ConfigError(read.problems)
    return read.config


def read_file(path: str | Path) -> str:
    """The text of a config file; a ConfigError naming it when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: cannot read: not UTF-8 text ({exc.reason})"]) from exc


def parse_yaml(text: str, source: str = "<config>") -> Any:
    """The YAML document in ``text``; a ConfigError naming ``source`` when it is not YAML."""
    stream = io.StringIO(text)
    stream.name = source  # PyYAML names the stream in its marks: 'in "config.yaml", line 3'
    try:
        return yaml.safe_load(stream)
    # PyYAML's constructors raise more than YAMLError on input they cannot build: ValueError
    # (a timestamp like 2024-02-31), KeyError (!!bool maybe), TypeError, RecursionError (deep
    # nesting)... Whatever it raises, the file is not usable YAML: say so, on one line.
    except Exception as exc:
        detail = str(exc) if isinstance(exc, yaml.YAMLError) else f"{type(exc).__name__} {exc}"
        raise ConfigError([f"{source}: not valid YAML: {detail}".replace("\n", " ")]) from exc


def load_config(path: str | Path) -> Config:
    """Reads and validates the YAML file at ``path`` (named aggregates unplanned)."""
    return parse_config(read_file(path), source=str(path))


def parse_config(text: str, source: str = "<config>") -> Config:
    return config_from_mapping(parse_yaml(text, source))


def _read_limits(reader: Reader, raw: Any) -> LimitsConfig:
    limits, _ = reader.simple_section(raw, LimitsConfig, "limits")
    if limits.backend == "redis" and not limits.redis_url:
        reader.problems.append("limits.redis_url: required when backend is redis")
    return limits


def _read_jwt(reader: Reader, raw: Any, path: str) -> JwtConfig:
    section = reader.section(raw, path)
    reader.unknown(section, keys_of(JwtConfig), path)
    for key in ("issuer", "audience"):
        if key not in section:
            reader.problems.append(f"{path}.{key}: required (tokens are checked against it)")
    jwt = JwtConfig(**reader.fields(section, JwtConfig, path))
    hmac = any(name.startswith("HS") for name in jwt.algorithms)
    if hmac and "secret_file" not in section:
        reader.problems.append(f"{path}.secret_file: required by the HS* algorithms")
    if not all(name.startswith("HS") for name in jwt.algorithms) and "keys" not in section:
        reader.problems.append(f"{path}.keys: required by the public-key algorithms")
    return jwt


def _read_caller(
    reader: Reader,
    name: str,
    raw: Any,
    upstreams: Collection[str],
    aggregates: Collection[str],
    path: str,
) -> CallerConfig:
    section = reader.section(raw, path)
    reader.unknown(section, keys_of(CallerConfig), path)
    if "certificate" not in section and "token_subject" not in section:
        reader.problems.append(f"{path}: needs a certificate or a token_subject to be known by")
    if "upstreams" not in section and "aggregates" not in section:
        reader.problems.append(f'{path}.upstreams: required (a list of upstream names, or "*")')
    rate_limit = {"rate_limit": lambda raw, at: reader.simple_section(raw, RateLimit, at)[0]}
    caller = CallerConfig(
        name=name, **reader.fields(section, CallerConfig, path, sections=rate_limit)
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
    reader: Reader,
    raw: Any,
    upstreams: Collection[str],
    aggregates: Collection[str],
    server: ServerConfig,
) -> AuthConfig:
    section = reader.section(raw, "auth")
    reader.unknown(section, keys_of(AuthConfig), "auth")
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
    reader: Reader,
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


def _read_aggregate(reader: Reader, name: str, raw: Any) -> AggregateConfig:
    path = f"aggregates.{key_label(name)}"
    if not NAME.match(name):
        reader.problems.append(f"{path}: aggregate names must match [A-Za-z0-9_.-]{{1,64}}")
    elif name == AD_HOC:
        reader.problems.append(f"{path}: {AD_HOC!r} is the metric label of ad-hoc calls")
    section = reader.section(raw, path)
    reader.unknown(section, keys_of(AggregateConfig), path)
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
                f"{path}.targets[{index}]: must be a mapping, got {kind_of(target)}"
            )
    params = {
        str(key): _read_param(reader, str(key), value, f"{path}.params.{key_label(key)}")
        for key, value in reader.section(section.get("params"), f"{path}.params").items()
    }
    return AggregateConfig(
        name=name,
        **reader.fields(section, AggregateConfig, path),
        params=params,
        targets=tuple(checked),
    )


def _read_param(reader: Reader, name: str, raw: Any, path: str) -> ParamConfig:
    if not PARAM_NAME.match(name):
        reader.problems.append(f"{path}: parameter names must match [A-Za-z0-9_-]{{1,64}}")
    section = reader.section(raw, path)
    reader.unknown(section, keys_of(ParamConfig), path)
    has_default = "default" in section
    required = reader.value(section, "required", path, to.boolean, not has_default)
    default = section.get("default")
    if required and has_default:
        reader.problems.append(f"{path}.default: a required parameter has no default")
    elif not required and not has_default:
        reader.problems.append(
            f"{path}.required: false needs a default (a default makes it optional)"
        )
    elif has_default:
        problem = to.json_value_problem(default)
        if problem:
            reader.problems.append(f"{path}.default: {problem}")
    return ParamConfig(name=name, required=required, default=default if has_default else None)
