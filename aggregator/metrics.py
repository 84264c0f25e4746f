"""Prometheus metrics of docs/operations.md, with every label child bound once at start-up.

Labels are bounded: upstream and aggregate names come from the config and outcomes from the
enum; no id, path or request value ever becomes a label.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Iterator
from typing import Protocol

import grpc
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from aggregator.errors import TargetFailure
from aggregator.outcomes import CACHE_NAMES, OUTCOME_NAMES
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import AD_HOC

# From a tenth of a millisecond (the service's own overhead) to the longest deadline.
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
CIRCUIT_STATES = {"closed": 0, "half-open": 1, "open": 2}
CACHE_RESULTS = tuple(name for value, name in CACHE_NAMES.items() if value)  # hit, miss, stale
REJECT_REASONS = ("max_concurrent_calls", "draining", "invalid_argument")
# An attempt that reached the upstream, by what came of it (a reply that is not ok: error).
_ATTEMPT_RESULTS = {
    pb.OUTCOME_TIMEOUT: "timeout",
    pb.OUTCOME_UNAVAILABLE: "unavailable",
    pb.OUTCOME_CANCELLED: "cancelled",
}


class Answered(Protocol):
    """An upstream's reply (aggregator/upstreams Reply), as far as an attempt's result goes."""

    @property
    def ok(self) -> bool: ...


def attempt_result(result: Answered | TargetFailure | None) -> str:
    """ok, error, timeout, unavailable or cancelled (None: the attempt was cancelled)."""
    if result is None:
        return "cancelled"
    if isinstance(result, TargetFailure):
        return _ATTEMPT_RESULTS.get(result.outcome, "error")
    return "ok" if result.ok else "error"


QUOTA_REASONS = ("rate_limit", "concurrency")  # a caller's quota (auth.callers.<name>)


class UpstreamMetrics:
    """The children of every per-upstream metric, for one upstream."""

    def __init__(self, metrics: Metrics, upstream: str) -> None:
        self._metrics = metrics
        self._upstream = upstream
        self.targets = {
            outcome: metrics.targets.labels(upstream, label)
            for outcome, label in OUTCOME_NAMES.items()
        }
        # Made on first use, then kept: most of their series never happen (a page of zeros).
        self._unsent: dict[int, Counter] = {}
        self._attempts: dict[tuple[str, str], Counter] = {}
        self.request_duration = metrics.upstream_request_duration.labels(upstream)
        self.cache = {
            result: metrics.cache_requests.labels(upstream, result) for result in CACHE_RESULTS
        }
        # docs/fleet.md: by upstream and state only, never by address (pod addresses churn).
        self.endpoints_active = metrics.upstream_endpoints.labels(upstream, "active")
        self.endpoints_ejected = metrics.upstream_endpoints.labels(upstream, "ejected")
        self.ejections = metrics.endpoint_ejections.labels(upstream)
        self.concurrency_limit = metrics.concurrency_limit.labels(upstream)
        self.connections = metrics.connections.pools[upstream]

    def __repr__(self) -> str:
        return f"<UpstreamMetrics {self._upstream}>"

    @property
    def circuit_state(self) -> Gauge:
        """The breaker's gauge: made when a breaker asks for it, so an upstream with no
        breaker has no series (a 0 would read as closed)."""
        return self._metrics.circuit_state.labels(self._upstream)

    def attempted(self, attempt: str, result: Answered | TargetFailure | None) -> None:
        """One attempt that reached the upstream: ``attempt`` first, retry or hedge."""
        key = (attempt, attempt_result(result))
        child = self._attempts.get(key)
        if child is None:
            child = self._attempts[key] = self._metrics.upstream_attempts.labels(
                self._upstream, *key
            )
        child.inc()

    def unsent(self, outcome: int) -> None:
        """One target that ended before its request reached the upstream."""
        child = self._unsent.get(outcome)
        if child is None:
            label = OUTCOME_NAMES.get(outcome, "unspecified")
            child = self._unsent[outcome] = self._metrics.targets_unsent.labels(
                self._upstream, label
            )
        child.inc()


class Metrics:
    """Every metric of the service, registered in ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        upstreams: Iterable[str],
        aggregates: Iterable[str] = (),
        callers: Iterable[str] = (),
    ) -> None:
        # No `_created` series: one per labelled child, they were two thirds of a fresh
        # server's /metrics and no query of the dashboard reads them (process-wide switch).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry
        # What /metrics serves: this process's registry, or with server.workers > 1 the
        # sum over every worker's files in PROMETHEUS_MULTIPROC_DIR.
        self.exposition = registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            self.exposition = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposition)  # type: ignore[no-untyped-call]
        self.calls = Counter(
            "aggregator_calls",
            "Aggregate and Collect calls by final gRPC status code and named aggregate.",
            ["code", "aggregate"], registry=registry,
        )  # fmt: skip
        self.call_duration = Histogram(
            "aggregator_call_duration_seconds", "Wall time of whole aggregates, by aggregate.",
            ["aggregate"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.targets = Counter(
            "aggregator_targets", "Targets by upstream and outcome (ok, error, timeout, ...).",
            ["upstream", "outcome"], registry=registry,
        )  # fmt: skip
        self.targets_unsent = Counter(
            "aggregator_targets_unsent",
            "Targets that ended before their request reached the upstream (refused by the "
            "aggregator: no descriptors, a substituted request its rules refuse), by outcome.",
            ["upstream", "outcome"], registry=registry,
        )  # fmt: skip
        self.upstream_attempts = Counter(
            "aggregator_upstream_attempts",
            "Attempts that reached an upstream, by attempt (first, retry, hedge) and result "
            "(ok, error, timeout, unavailable, cancelled).",
            ["upstream", "attempt", "result"], registry=registry,
        )  # fmt: skip
        self.upstream_request_duration = Histogram(
            "aggregator_upstream_request_duration_seconds",
            "Duration of single upstream attempts (retries and hedges included).",
            ["upstream"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.fanin_wait = Histogram(
            "aggregator_fanin_wait_seconds", "Time from an aggregate's first result to its last.",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.overhead = Histogram(
            "aggregator_overhead_seconds",
            "Aggregate wall time minus its slowest target's latency.",
            buckets=_OVERHEAD_BUCKETS, registry=registry,
        )  # fmt: skip
        self.circuit_state = Gauge(
            "aggregator_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["upstream"], registry=registry, multiprocess_mode="max",
        )  # fmt: skip
        self.cache_requests = Counter(
            "aggregator_cache_requests", "Response cache look-ups by upstream and result.",
            ["upstream", "result"], registry=registry,
        )  # fmt: skip
        self.upstream_endpoints = Gauge(
            "aggregator_upstream_endpoints", "Endpoints of an upstream by state: active, ejected.",
            ["upstream", "state"], registry=registry, multiprocess_mode="max",
        )  # fmt: skip
        self.endpoint_ejections = Counter(
            "aggregator_endpoint_ejections", "Endpoints ejected by outlier detection.",
            ["upstream"], registry=registry,
        )  # fmt: skip
        self.concurrency_limit = Gauge(
            "aggregator_upstream_concurrency_limit",
            "Attempts an upstream may have in flight (max_concurrency, or its adaptive limit).",
            ["upstream"], registry=registry, multiprocess_mode="max",
        )  # fmt: skip
        self.inflight = Gauge(
            "aggregator_inflight_calls", "Aggregate and Collect calls in flight.",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.rejected = Counter(
            "aggregator_rejected_calls", "Calls refused before any upstream was called, by reason.",
            ["reason"], registry=registry,
        )  # fmt: skip
        # Per aggregate label (a configured name, or ad_hoc: callers cannot add values).
        self.calls_by_code: dict[str, dict[grpc.StatusCode, Counter]] = {}
        self.call_duration_of: dict[str, Histogram] = {}
        self.add_aggregates((AD_HOC, *aggregates))
        self.connections = Connections(upstreams)
        registry.register(self.connections)
        if self.exposition is not registry:  # workers > 1: the worker that answers the scrape
            self.exposition.register(self.connections)
        self.upstreams = {name: UpstreamMetrics(self, name) for name in self.connections.pools}
        self.rejected_by = {reason: self.rejected.labels(reason) for reason in REJECT_REASONS}
        _add_runtime_collectors(self.exposition)
        self._quota_metrics(registry, callers)

    def _quota_metrics(self, registry: CollectorRegistry, callers: Iterable[str]) -> None:
        """Callers' quotas and the limits backend (docs/operations.md, "Many replicas")."""
        self.caller_rejections = Counter(
            "aggregator_caller_rejections",
            "Calls refused by their caller's quota (auth.callers), by caller and reason.",
            ["caller", "reason"], registry=registry,
        )  # fmt: skip
        # Caller names come from the config: a label value no request can add.
        self.caller_rejections_by = {
            (caller, reason): self.caller_rejections.labels(caller, reason)
            for caller in callers
            for reason in QUOTA_REASONS
        }
        self.limit_backend_errors = Counter(
            "aggregator_limit_backend_errors",
            "Admissions limits.backend (Redis) did not decide, decided by on_backend_error.",
            registry=registry,
        )

    def add_aggregates(self, labels: Iterable[str]) -> None:
        """Binds the children of aggregates not seen yet (a config reload may add some)."""
        for label in labels:
            if label not in self.call_duration_of:
                self.calls_by_code[label] = {
                    code: self.calls.labels(code.name, label) for code in grpc.StatusCode
                }
                self.call_duration_of[label] = self.call_duration.labels(label)

    def upstream(self, name: str) -> UpstreamMetrics:
        """The upstream's children, bound on first use (a config reload may add upstreams)."""
        found = self.upstreams.get(name)
        if found is None:
            self.connections.pools.setdefault(name, weakref.WeakSet())
            found = self.upstreams[name] = UpstreamMetrics(self, name)
        return found

    def __repr__(self) -> str:
        return f"<Metrics [{len(self.upstreams)} upstreams, pid {os.getpid()}]>"


def _add_runtime_collectors(registry: CollectorRegistry) -> None:
    """prometheus-client's process_*, python_info and python_gc_* series, which only its default
    registry has by itself. They describe the process that answers the scrape (each worker
    answers for itself when there are several)."""
    if registry is REGISTRY:  # it has them already
        return
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


class Pooled(Protocol):
    def connections(self) -> tuple[int, int]:
        """Connections open now: (idle, busy)."""
        ...


class Connections:
    """``aggregator_upstream_connections{upstream,state}``: the connections of each upstream's
    pools, read from them at scrape time (nothing on the request path). Pools come and go with
    a fleet's endpoints: they are held weakly, and a closed one counts nothing."""

    def __init__(self, upstreams: Iterable[str]) -> None:
        self.pools: dict[str, weakref.WeakSet[Pooled]] = {
            name: weakref.WeakSet() for name in upstreams
        }

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for upstream, pools in self.pools.items():
            idle = busy = 0
            for pool in list(pools):
                pool_idle, pool_busy = pool.connections()
                idle += pool_idle
                busy += pool_busy
            family.add_metric([upstream, "idle"], idle)
            family.add_metric([upstream, "busy"], busy)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "aggregator_upstream_connections",
            "Open connections to a REST upstream by state: idle (kept alive), busy.",
            labels=["upstream", "state"],
        )
