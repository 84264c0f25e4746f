"""Metrics of docs/operations.md on /metrics, and the one structured log line per aggregate."""

from __future__ import annotations

import json
import logging
import sys

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.logs import JsonFormatter, TextFormatter
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http
from tests.e2e.test_admin import recorded

SPEC_METRICS = {
    "aggregator_calls": "counter",
    "aggregator_call_duration_seconds": "histogram",
    "aggregator_targets": "counter",
    "aggregator_upstream_request_duration_seconds": "histogram",
    "aggregator_fanin_wait_seconds": "histogram",
    "aggregator_overhead_seconds": "histogram",
    "aggregator_circuit_state": "gauge",
    "aggregator_cache_requests": "counter",
    "aggregator_inflight_calls": "gauge",
    "aggregator_rejected_calls": "counter",
}


async def scrape(port: int) -> dict[str, object]:
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_metrics_of_the_spec_are_served_with_bounded_labels(start_server, rest):
    breaker = {"fail_max": 5, "reset_timeout": "1s"}
    server, stub = await start_server(
        server={"metrics_address": "127.0.0.1:0"},
        guarded={"kind": "http", "url": rest.url, "circuit_breaker": breaker},
    )
    request = pb.AggregateRequest(
        targets=[
            http("fine", "/delay/5", upstream="guarded"),
            http("secret-id-123", "/status/503", query={"user": "alice"}),
        ]
    )
    await collect(stub.Aggregate(request, timeout=5))
    families = await scrape(server.metrics_port)

    for name, kind in SPEC_METRICS.items():
        assert families[name].type == kind, name
    samples = [s for family in families.values() for s in family.samples]
    labels = {value for sample in samples for value in sample.labels.values()}
    assert not labels & {"fine", "secret-id-123", "alice", "/status/503"}  # no ids, paths, values

    def value(name: str, **labels: str) -> float:
        return next(s.value for s in samples if s.name == name and s.labels == labels)

    assert value("aggregator_calls_total", code="OK", aggregate="ad_hoc") == 1
    # The admin API's outcome names, not the proto enum's OUTCOME_OK.
    assert value("aggregator_targets_total", upstream="guarded", outcome="ok") == 1
    assert value("aggregator_targets_total", upstream="rest", outcome="error") == 1
    assert not {label for label in labels if label.startswith("OUTCOME_")}
    assert value("aggregator_circuit_state", upstream="guarded") == 0
    assert value("aggregator_inflight_calls") == 0
    assert value("aggregator_overhead_seconds_count") == 1
    # Buckets from a tenth of a millisecond: the service's own overhead is measurable.
    buckets = [
        float(s.labels["le"])
        for s in samples
        if s.name == "aggregator_overhead_seconds_bucket" and s.labels["le"] != "+Inf"
    ]
    assert min(buckets) <= 0.0001


@pytest.fixture
def log_lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="aggregator")
    return caplog


async def test_one_json_log_line_per_aggregate_without_secrets(stub, log_lines):
    request = pb.AggregateRequest(
        targets=[
            http("fast", "/delay/1", headers={"Authorization": "Bearer s3cr3t"}),
            http("slow", "/delay/60"),
            http("broken", "/status/500", method="POST", json=pb.HttpCall().json),
        ]
    )
    call = stub.Aggregate(request, timeout=5, metadata=(("x-request-id", "req-7"),))
    await collect(call)
    records = [r for r in log_lines.records if getattr(r, "request_id", None) == "req-7"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "req-7"
    assert line["code"] == "OK"
    assert line["targets"] == 3
    assert line["failed"] == "broken"
    assert line["slowest"] == "slow"
    assert line["elapsed_ms"] >= line["overhead_ms"] >= 0
    assert "s3cr3t" not in json.dumps(line)


def test_text_lines_carry_the_extra_fields_and_tracebacks_like_logging_does():
    formatter = TextFormatter()
    plain = logging.makeLogRecord({"msg": "ready", "name": "aggregator", "levelname": "INFO"})
    with_fields = logging.makeLogRecord(
        {"msg": "aggregate %s", "args": ("r1",), "name": "aggregator.server",
         "levelname": "INFO", "request_id": "r1", "elapsed_ms": 21.5}
    )  # fmt: skip
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.makeLogRecord(
            {
                "msg": "broke\n",
                "name": "aggregator",
                "levelname": "ERROR",
                "exc_info": sys.exc_info(),
            }
        )
    assert formatter.format(plain).endswith(" INFO aggregator ready")
    assert formatter.format(with_fields).endswith(
        " INFO aggregator.server aggregate r1 request_id=r1 elapsed_ms=21.5"
    )
    first, second, *rest = formatter.format(failed).splitlines()
    assert first.endswith(" ERROR aggregator broke")
    assert second == "Traceback (most recent call last):"  # no blank line in between
    assert rest[-1] == "ValueError: boom"
    # The same date and time as logging's own formatter, to the millisecond.
    assert formatter.format(plain)[:23] == logging.Formatter("%(asctime)s").format(plain)


async def test_metrics_carry_no_created_series(start_server):
    server, _ = await start_server(server={"metrics_address": "127.0.0.1:0"})
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    assert "_created" not in text  # one per child, most of the page, read by no dashboard
    # A fresh server's page is mostly zeros; prometheus-client's process_* and python_* series
    # take about 1.7 KB of it.
    assert len(text.encode()) < 17_000


async def test_the_start_line_names_every_port_bound(start_server, log_lines):
    server, _ = await start_server(
        server={"metrics_address": "127.0.0.1:0", "health_address": "127.0.0.1:0"}
    )
    started = [r.getMessage() for r in log_lines.records if r.getMessage().startswith("serving")]
    assert started == [
        f"serving gRPC on 127.0.0.1:{server.port} (plaintext), "
        f"health on 127.0.0.1:{server.health_port} (plaintext, grpc.health.v1 only), "
        f"metrics on http://127.0.0.1:{server.metrics_port}/metrics, admin page off"
    ]


async def test_gauges_state_only_what_exists(start_server, rest):
    """One literal address is one active endpoint (an "active == 0" alert must not fire for a
    healthy upstream); an upstream with no breaker has no circuit_state series (0 would read
    as closed)."""
    server, _ = await start_server(
        server={"metrics_address": "127.0.0.1:0"},
        guarded={"kind": "http", "url": rest.url, "circuit_breaker": {"fail_max": 5}},
    )
    families = await scrape(server.metrics_port)
    samples = [s for family in families.values() for s in family.samples]

    def series(name: str) -> dict[str, float]:
        return {s.labels["upstream"]: s.value for s in samples if s.name == name}

    endpoints = {
        s.labels["upstream"]: s.value
        for s in samples
        if s.name == "aggregator_upstream_endpoints" and s.labels["state"] == "active"
    }
    assert endpoints == {"rest": 1, "rpc": 1, "dead": 1, "guarded": 1}
    assert series("aggregator_circuit_state") == {"guarded": 0}


async def test_process_and_python_series_are_served(start_server):
    server, _ = await start_server(server={"metrics_address": "127.0.0.1:0"})
    families = await scrape(server.metrics_port)
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    assert families["process_cpu_seconds"].type == "counter"
    assert families["python_info"].samples
    assert families["python_gc_collections"].samples


async def test_attempts_are_counted_by_kind_and_result(start_server, rest):
    server, stub = await start_server(
        server={"metrics_address": "127.0.0.1:0"},
        retried={"kind": "http", "url": rest.url, "retry": {"attempts": 3, "backoff": "1ms"}},
        hedged={"kind": "http", "url": rest.url, "hedge": {"delay": "20ms"}},
    )
    request = pb.AggregateRequest(
        targets=[
            http("a", "/flaky/a/2", upstream="retried"),  # 503, 503, then 200
            http("b", "/slow-first/b", upstream="hedged"),  # the first hangs: the hedge answers
        ]
    )
    results, _, _, _ = await collect(stub.Aggregate(request, timeout=5))
    assert [r.outcome for r in results] == [pb.OUTCOME_OK] * 2
    families = await scrape(server.metrics_port)
    counted = {
        (s.labels["upstream"], s.labels["attempt"], s.labels["result"]): s.value
        for s in families["aggregator_upstream_attempts"].samples
        if s.name == "aggregator_upstream_attempts_total"
    }
    assert counted == {
        ("retried", "first", "error"): 1,
        ("retried", "retry", "error"): 1,
        ("retried", "retry", "ok"): 1,
        ("hedged", "hedge", "ok"): 1,
        ("hedged", "first", "cancelled"): 1,  # the loser, cancelled once the hedge answered
    }


async def test_only_what_an_upstream_did_counts_against_it(start_server, rest, rpc):
    """A target refused here (no descriptors to write its JSON) and one cancelled because a
    required target failed are not the upstream's errors: neither on /metrics' error share
    nor on the admin page's error rate."""
    server, stub = await start_server(
        server={"metrics_address": "127.0.0.1:0", "admin_address": "127.0.0.1:0"},
        plain={"kind": "grpc", "address": rpc.address},  # no reflection, no descriptors
    )
    unsent = pb.Target(id="typed", grpc=pb.GrpcCall(upstream="plain", method="/test.Upstream/Echo"))
    unsent.grpc.json.string_value = "hello"
    fine = pb.AggregateRequest(targets=[http("fine", "/delay/1")])
    await collect(stub.Aggregate(fine, timeout=5))
    request = pb.AggregateRequest(
        targets=[
            unsent,
            http("waiting", "/hang"),
            http("needed", "/x", upstream="dead", required=True),
        ]
    )
    call = stub.Aggregate(request, timeout=5, metadata=(("x-request-id", "not-theirs"),))
    results, _, _, _ = await collect(call)
    outcomes = {r.id: r.outcome for r in results}
    assert outcomes["typed"] == pb.OUTCOME_UNAVAILABLE
    assert outcomes["waiting"] == pb.OUTCOME_CANCELLED
    await recorded(server, "not-theirs")
    families = await scrape(server.metrics_port)
    targets = {
        (s.labels["upstream"], s.labels["outcome"]): s.value
        for s in families["aggregator_targets"].samples
        if s.name == "aggregator_targets_total" and s.value
    }
    assert targets == {("rest", "ok"): 1, ("rest", "cancelled"): 1, ("dead", "unavailable"): 1}
    unsent_samples = families["aggregator_targets_unsent"].samples
    assert [(s.labels["upstream"], s.value) for s in unsent_samples if s.value] == [("plain", 1)]
    url = f"http://127.0.0.1:{server.admin_port}/api/upstreams"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        upstreams = await response.json()
    rates = {u["name"]: u["error_rate"] for u in upstreams["upstreams"]}
    assert rates["rest"] == 0  # one OK target; the cancelled one says nothing of it
    assert rates["plain"] is None  # nothing reached it
    assert rates["dead"] == 1
