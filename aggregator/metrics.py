"""Prometheus metrics of docs/operations.md, with every label child bound once at start-up.

Labels are bounded: upstream and aggregate names come from the config and outcomes from the
enum; no id, path or request value ever becomes a label.
"""

from __future__ import annotations

import bisect
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class Increments(Protocol):
    """A counter's child: prometheus-client's, or a ``Tally``."""

    def inc(self) -> None: ...


class Observes(Protocol):
    """A histogram's child: prometheus-client's, or a ``Timings``."""

    def observe(self, amount: float) -> None: ...


class Counters(Protocol):
    def labels(self, *values: str) -> Increments: ...


class Histograms(Protocol):
    def labels(self, *values: str) -> Observes: ...


class Tally:
    """One counter series as a plain float: written on the event loop's thread only (every
    metric call of the request path runs there), read by a scrape on that same thread."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self) -> None:
        self.value += 1


class Timings:
    """One histogram series: a count per bucket (not cumulative; the last one +Inf) and the
    sum. ``bisect`` finds the bucket prometheus-client's loop would (the first bound >= the
    amount)."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, amount)] += 1
        self.sum += amount


Child = TypeVar("Child", Tally, Timings)


class _Family(Collector, Generic[Child]):
    """A metric whose series are plain numbers, exposed by ``collect`` exactly as
    prometheus-client exposes its own (names, help, labels, order of series, float values).

    Why: prometheus-client takes a lock and checks per inc/observe, and loops over the buckets
    in Python per observe: the 19 calls of a 5-target aggregate cost ~40 us of the ~200 its
    observing took (bench/observe.py). Its multi-process mode needs its own values (files the
    workers share), so ``Metrics`` uses these only in a single process."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        registry.register(self)
        if not self._labelnames:  # as prometheus-client: an unlabelled series shows at once
            self.labels()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name} [{len(self._children)} series]>"

    def labels(self, *values: str) -> Child:
        key = tuple(str(value) for value in values)
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self._name}: {len(self._labelnames)} label values expected")
            child = self._children[key] = self._child()
        return child

    def _child(self) -> Child:
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> Iterator[Metric]:
        yield self._family()


class TallyFamily(_Family[Tally]):
    """A counter (``name`` without ``_total``, as prometheus-client's ``Counter`` takes it)."""

    def _child(self) -> Tally:
        return Tally()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._children.items():
            family.add_metric(values, child.value)
        yield family


class TimingsFamily(_Family[Timings]):
    """A histogram with fixed ``buckets`` (their upper bounds, +Inf implied)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._bounds = tuple(float(bound) for bound in buckets)
        self._les = [
            floatToGoString(bound)  # type: ignore[no-untyped-call]
            for bound in (*self._bounds, float("inf"))
        ]
        super().__init__(name, documentation, labelnames, registry=registry)

    def observe(self, amount: float) -> None:
        """The unlabelled histogram's one series (as prometheus-client's ``observe``)."""
        self._children[()].observe(amount)

    def _child(self) -> Timings:
        return Timings(self._bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._children.items():
            cumulative, buckets = 0.0, []
            for le, count in zip(self._les, child.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(values, buckets, child.sum)
        yield family


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
        self._unsent: dict[int, Increments] = {}
        self._attempts: dict[tuple[str, str], Increments] = {}
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
        # The counters and histograms of the request path: plain numbers in one process,
        # prometheus-client's own (its files) when the workers' metrics are summed.
        counter: type[Counter | TallyFamily] = TallyFamily
        histogram: type[Histogram | TimingsFamily] = TimingsFamily
        if self.exposition is not registry:
            counter, histogram = Counter, Histogram
        self.calls: Counters = counter(
            "aggregator_calls",
            "Aggregate and Collect calls by final gRPC status code and named aggregate.",
            ["code", "aggregate"], registry=registry,
        )  # fmt: skip
        self.call_duration: Histograms = histogram(
            "aggregator_call_duration_seconds", "Wall time of whole aggregates, by aggregate.",
            ["aggregate"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.targets: Counters = counter(
            "aggregator_targets", "Targets by upstream and outcome (ok, error, timeout, ...).",
            ["upstream", "outcome"], registry=registry,
        )  # fmt: skip
        self.targets_unsent: Counters = counter(
            "aggregator_targets_unsent",
            "Targets that ended before their request reached the upstream (refused by the "
            "aggregator: no descriptors, a substituted request its rules refuse), by outcome.",
            ["upstream", "outcome"], registry=registry,
        )  # fmt: skip
        self.upstream_attempts: Counters = counter(
            "aggregator_upstream_attempts",
            "Attempts that reached an upstream, by attempt (first, retry, hedge) and result "
            "(ok, error, timeout, unavailable, cancelled).",
            ["upstream", "attempt", "result"], registry=registry,
        )  # fmt: skip
        self.upstream_request_duration: Histograms = histogram(
            "aggregator_upstream_request_duration_seconds",
            "Duration of single upstream attempts (retries and hedges included).",
            ["upstream"], buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.fanin_wait: Observes = histogram(
            "aggregator_fanin_wait_seconds", "Time from an aggregate's first result to its last.",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.overhead: Observes = histogram(
            "aggregator_overhead_seconds",
            "Aggregate wall time minus its slowest target's latency.",
            buckets=_OVERHEAD_BUCKETS, registry=registry,
        )  # fmt: skip
        self.circuit_state = Gauge(
            "aggregator_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["upstream"], registry=registry, multiprocess_mode="max",
        )  # fmt: skip
        self.cache_requests: Counters = counter(
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
        self.calls_by_code: dict[str, dict[grpc.StatusCode, Increments]] = {}
        self.call_duration_of: dict[str, Observes] = {}
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
