"""The Grafana dashboard in deploy/grafana: it loads, its panels are laid out, and every PromQL
query names only series, labels and label values that a real server exposes on /metrics."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "aggregator-dashboard.json"
SPEC_METRICS = (
    "aggregator_calls_total", "aggregator_call_duration_seconds", "aggregator_targets_total",
    "aggregator_upstream_request_duration_seconds", "aggregator_fanin_wait_seconds",
    "aggregator_overhead_seconds", "aggregator_circuit_state", "aggregator_cache_requests_total",
    "aggregator_inflight_calls", "aggregator_rejected_calls_total",
    "aggregator_upstream_attempts_total",
)  # fmt: skip
# Labels Prometheus adds to every scraped series (the target's), so queries may use them.
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
FUNCTIONS = {"rate", "sum", "max", "histogram_quantile", "sort_desc"}
KEYWORDS = {"by", "without", "and", "or", "unless", "on", "ignoring", "bool"}

SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
BARE = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])")
LABEL_VALUES = re.compile(r"^label_values\(([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s*,\s*(\w+)\)$")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def exprs() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


class Exposition:
    """What /metrics served: each series name with the label names and values seen on it."""

    def __init__(self, text: str) -> None:
        self.labels: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.kinds: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.kinds[sample.name] = family.type
                for label, value in sample.labels.items():
                    self.labels[sample.name][label].add(value)

    def __contains__(self, name: str) -> bool:
        return name in self.kinds


@pytest.fixture
async def exposition(start_server, rest) -> Exposition:
    """A real server's /metrics after real calls: OK, a failing target, a refused request."""
    server, stub = await start_server(
        server={"metrics_address": "127.0.0.1:0"},
        cached={"kind": "http", "url": rest.url, "cache": {"ttl": "30s"}},
        guarded={"kind": "http", "url": rest.url, "circuit_breaker": {"fail_max": 5}},
    )
    ok = pb.AggregateRequest(
        targets=[
            http("a", "/delay/5", upstream="cached"),
            http("b", "/status/503", upstream="guarded"),
        ]
    )
    for _ in range(2):  # the second one hits the cache
        await collect(stub.Aggregate(ok, timeout=5))
    refused = pb.AggregateRequest(targets=[http("a", "/x", upstream="nowhere")])
    await collect(stub.Aggregate(refused, timeout=5))
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return Exposition(await response.text())


def parse(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], list[str], list[str]]:
    """Selectors (metric, matchers), grouping labels, and bare identifiers of a PromQL expr."""
    expr = expr.replace("$__rate_interval", "5m")
    groupings = [label.strip() for group in GROUPING.findall(expr) for label in group.split(",")]
    expr = GROUPING.sub(" ", expr)
    selectors = [(name, MATCHER.findall(body)) for name, body in SELECTOR.findall(expr)]
    rest = SELECTOR.sub(" ", expr)
    bare = [name for name in BARE.findall(rest) if name not in FUNCTIONS | KEYWORDS]
    return selectors, [label for label in groupings if label], bare


def test_dashboard_loads_and_its_panels_are_laid_out():
    board = dashboard()
    all_panels = board["panels"]

    assert board["uid"] == "aggregator"
    assert len({p["id"] for p in all_panels}) == len(all_panels)
    cells: set[tuple[int, int]] = set()
    for panel in all_panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["description"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_every_spec_metric_has_a_panel():
    used = {name for expr in exprs() for name, _ in parse(expr)[0]}
    for metric in SPEC_METRICS:
        assert any(name == metric or name.startswith(f"{metric}_") for name in used), metric


@pytest.mark.parametrize("expr", exprs())
async def test_queries_use_only_series_labels_and_values_the_server_exposes(expr, exposition):
    selectors, groupings, bare = parse(expr)

    assert bare == [], f"unparsed identifiers {bare} in {expr}"
    assert selectors, expr
    known_labels = set(TARGET_LABELS) | {"le"}
    for name, matchers in selectors:
        assert name in exposition, f"{name} is not on /metrics"
        labels = exposition.labels[name]
        known_labels |= set(labels)
        for label, operator, value in matchers:
            assert label in set(labels) | TARGET_LABELS, f"{name} has no label {label}"
            if label in TARGET_LABELS or "$" in value:
                continue
            alternatives = value.split("|") if operator in ("=~", "!~") else [value]
            for alternative in alternatives:
                assert alternative in labels[label], f'{name}{{{label}="{alternative}"}} never seen'
    assert set(groupings) <= known_labels, expr


@pytest.mark.parametrize("expr", exprs())
async def test_counters_are_rated_and_histograms_read_through_their_buckets(expr, exposition):
    for name, _ in parse(expr)[0]:
        rated = re.search(rf"rate\(\s*{name}\{{", expr) is not None
        kind = exposition.kinds[name]
        if kind in ("counter", "histogram"):
            assert rated, f"{name} ({kind}) is used without rate() in {expr}"
        else:
            assert not rated, f"{name} ({kind}) is rated in {expr}"
        if name.endswith("_bucket"):
            assert "histogram_quantile(" in expr
            assert all("le" in [label.strip() for label in group.split(",")]
                       for group in GROUPING.findall(expr)), expr  # fmt: skip


async def test_template_variables_query_exposed_labels(exposition):
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}

    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "upstream"):
        match = LABEL_VALUES.match(variables[name]["query"]["query"])
        assert match, variables[name]["query"]
        metric, _, label = match.groups()
        assert metric in exposition
        assert label in set(exposition.labels[metric]) | TARGET_LABELS
    for expr in exprs():
        for variable in re.findall(r"\$(\w+)", expr):
            assert variable in variables or variable == "__rate_interval", expr
