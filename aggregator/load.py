"""Loading a config: read it (aggregator/config), then plan its named aggregates
(aggregator/aggregates.py), as `aggregator check-config` and `aggregator serve` do.

This step sits above both: the config cannot import the planner (the planner reads the config),
so the problems of both are gathered here, in one list, each led by its key path::

    aggregates.product_page.targets[0].http.upstream: 'nowhere' is not a configured upstream
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aggregator.aggregates import Catalog
from aggregator.config import AggregateConfig, Config, ConfigError, parse_yaml, read_config
from aggregator.config import read_file as read_config_file


@dataclass(frozen=True, slots=True)
class Loaded:
    """A valid config (its ``warnings`` include the named aggregates') and its aggregates,
    planned."""

    config: Config
    catalog: Catalog


def load(path: str | Path) -> Loaded:
    """Reads, validates and plans the YAML file at ``path``; raises ConfigError."""
    return load_text(read_config_file(path), source=str(path))


def load_text(text: str, source: str = "<config>") -> Loaded:
    """As ``load``, for a document already read (``source`` names it in problems)."""
    return load_mapping(parse_yaml(text, source))


def load_mapping(raw: Any) -> Loaded:
    """As ``load``, for parsed YAML: the config's problems, then the named aggregates'."""
    read = read_config(raw)
    problems = list(read.problems)
    # An aggregate calling an upstream that could not be read (it has no kind) is not planned:
    # every target would only repeat "not a configured upstream" about a problem already listed.
    plannable = {
        name: aggregate
        for name, aggregate in read.config.aggregates.items()
        if not _calls_any(aggregate, read.unreadable)
    }
    catalog: Catalog | None = None
    try:
        catalog = Catalog(replace(read.config, aggregates=plannable))
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems or catalog is None:
        raise ConfigError(problems)
    return Loaded(replace(read.config, warnings=catalog.warnings), catalog)


def _calls_any(aggregate: AggregateConfig, upstreams: Collection[str]) -> bool:
    """Whether a target of ``aggregate`` (as written) names one of ``upstreams``."""
    for target in aggregate.targets:
        for kind in ("http", "grpc"):
            call = target.get(kind)
            if isinstance(call, dict) and call.get("upstream") in upstreams:
                return True
    return False
