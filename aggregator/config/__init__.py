"""The service's configuration: one YAML file, validated once at start.

Every problem is reported at once, one line each, naming its key path::

    upstreams.catalog.retry.backoff: "10 sec" is not a duration (use 250ms, 2s, 1m)

The result is a tree of frozen dataclasses passed explicitly to whatever needs it. The package:
schema.py declares each key once (default and converter), reader.py walks the declarations,
convert.py and files.py check values and the files they name, upstreams.py and document.py read
the sections and cross-check them. Named aggregates are planned above, in aggregator/load.py.
"""

from __future__ import annotations

from aggregator.config.document import (
    Read,
    config_from_mapping,
    load_config,
    parse_config,
    parse_yaml,
    read_config,
    read_file,
)
from aggregator.config.reader import ConfigError, key_label
from aggregator.config.schema import (
    BALANCERS,
    CACHE_BACKENDS,
    EVENT_LOOPS,
    LOG_FORMATS,
    MIB,
    TRACE_EXPORTERS,
    AggregateConfig,
    AuthConfig,
    BreakerPolicy,
    CachePolicy,
    CallerConfig,
    Config,
    HedgePolicy,
    JwtConfig,
    LimitsConfig,
    OutlierDetection,
    ParamConfig,
    RateLimit,
    RetryPolicy,
    ServerConfig,
    ServerTls,
    TracingConfig,
    UpstreamConfig,
    UpstreamRateLimit,
    UpstreamTls,
)
from aggregator.durations import parse_duration

__all__ = [
    "BALANCERS",
    "CACHE_BACKENDS",
    "EVENT_LOOPS",
    "LOG_FORMATS",
    "MIB",
    "TRACE_EXPORTERS",
    "AggregateConfig",
    "AuthConfig",
    "BreakerPolicy",
    "CachePolicy",
    "CallerConfig",
    "Config",
    "ConfigError",
    "HedgePolicy",
    "JwtConfig",
    "LimitsConfig",
    "OutlierDetection",
    "ParamConfig",
    "RateLimit",
    "Read",
    "RetryPolicy",
    "ServerConfig",
    "ServerTls",
    "TracingConfig",
    "UpstreamConfig",
    "UpstreamRateLimit",
    "UpstreamTls",
    "config_from_mapping",
    "key_label",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_yaml",
    "read_config",
    "read_file",
]
