"""The request path's counters and histograms (aggregator/metrics.py TallyFamily, TimingsFamily)
expose exactly what prometheus-client's own Counter and Histogram expose for the same calls:
the dashboard, the alerts and docs/operations.md read those names, labels and buckets."""

from __future__ import annotations

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from aggregator.metrics import Metrics, TallyFamily, TimingsFamily

BUCKETS = (0.0001, 0.00025, 0.001, 0.025, 1.0, 30.0)
# On a bound, between bounds, below the first, past the last, zero and negative.
AMOUNTS = (0.0001, 0.0002, 0.00005, 0.02, 1.0, 31.5, 0.0, -0.5, 1e-9, 29.99)


@pytest.fixture(autouse=True)
def _no_created_series():
    """As the server runs (Metrics switches the `_created` series off, process-wide)."""
    disable_created_metrics()


def _both(kind: str) -> tuple[CollectorRegistry, CollectorRegistry, object, object]:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    if kind == "counter":
        return (
            ours,
            theirs,
            TallyFamily("demo", "Some help.", ["upstream", "outcome"], registry=ours),
            Counter("demo", "Some help.", ["upstream", "outcome"], registry=theirs),
        )
    return (
        ours,
        theirs,
        TimingsFamily("demo_seconds", "Some help.", ["upstream"], buckets=BUCKETS, registry=ours),
        Histogram("demo_seconds", "Some help.", ["upstream"], buckets=BUCKETS, registry=theirs),
    )


@pytest.mark.parametrize("render", [generate_latest, openmetrics_latest])
def test_a_tally_family_exposes_what_a_counter_does(render):
    ours, theirs, mine, reference = _both("counter")
    for family in (mine, reference):
        family.labels("b", "ok")  # bound, never counted: a zero series
        for _ in range(3):
            family.labels("a", "ok").inc()
        family.labels("a", "timeout").inc()
    assert render(ours) == render(theirs)
    assert ours.get_sample_value("demo_total", {"upstream": "a", "outcome": "ok"}) == 3


@pytest.mark.parametrize("render", [generate_latest, openmetrics_latest])
def test_a_timings_family_exposes_what_a_histogram_does(render):
    ours, theirs, mine, reference = _both("histogram")
    for family in (mine, reference):
        family.labels("idle")
        for amount in AMOUNTS:
            family.labels("busy").observe(amount)
    assert render(ours) == render(theirs)
    assert ours.get_sample_value("demo_seconds_count", {"upstream": "busy"}) == len(AMOUNTS)


def test_unlabelled_families_show_their_series_at_once_and_observe_without_labels():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    mine = TimingsFamily("wait_seconds", "Help.", buckets=BUCKETS, registry=ours)
    reference = Histogram("wait_seconds", "Help.", buckets=BUCKETS, registry=theirs)
    TallyFamily("errors", "Help.", registry=ours)
    Counter("errors", "Help.", registry=theirs)
    assert generate_latest(ours) == generate_latest(theirs)
    mine.observe(0.02)
    reference.observe(0.02)
    assert generate_latest(ours) == generate_latest(theirs)


def test_a_family_refuses_the_wrong_number_of_label_values_and_a_second_registration():
    registry = CollectorRegistry()
    family = TallyFamily("demo", "Help.", ["upstream"], registry=registry)
    with pytest.raises(ValueError, match="1 label values"):
        family.labels("a", "b")
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("demo", "Help.", registry=registry)


def test_the_service_metrics_expose_the_same_page_in_one_process_as_with_prometheus_client(
    monkeypatch,
):
    """The whole /metrics page of the request path's metrics, fed the same calls, against the
    same Metrics built on prometheus-client's own classes (what workers > 1 use)."""
    import aggregator.metrics as module

    pages = []
    for counter, histogram in ((TallyFamily, TimingsFamily), (Counter, Histogram)):
        monkeypatch.setattr(module, "TallyFamily", counter)
        monkeypatch.setattr(module, "TimingsFamily", histogram)
        metrics = Metrics(CollectorRegistry(), ["u1", "u2"], ["named"])
        metrics.calls_by_code["named"][next(iter(metrics.calls_by_code["named"]))].inc()
        metrics.call_duration_of["ad_hoc"].observe(0.021)
        metrics.overhead.observe(0.0004)
        metrics.fanin_wait.observe(0.0012)
        upstream = metrics.upstream("u2")
        upstream.targets[next(iter(upstream.targets))].inc()
        upstream.attempted("first", None)
        upstream.unsent(0)
        upstream.request_duration.observe(0.5)
        upstream.cache["hit"].inc()
        page = generate_latest(metrics.registry).decode().splitlines()
        pages.append([line for line in page if "aggregator_" in line])  # not process_*
    assert pages[0] == pages[1]
    attempts = 'aggregator_upstream_attempts_total{attempt="first",result="cancelled",upstream="u2"'
    assert f"{attempts}}} 1.0" in pages[0]
