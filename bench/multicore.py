"""The multicore mode: what one node does with ``server.workers`` (docs/performance.md).

Two more aggregators, ``workers: 1`` and ``workers: W``, both on every CPU with the same config,
take turns (sides alternating round by round) on cache-hot at c64, where the upstreams cost
nothing once each worker's cache holds the answers, so the harness can feed them. The load
comes through CHANNELS_PER_WORKER x W connections, which SO_REUSEPORT spreads over the workers;
server CPU is summed over every worker process.

On a small machine the load generator shares the aggregator's CPUs here, so calls/s at W
workers understates what W cores give; the projection to more cores uses CPU per aggregate
instead (calls/s per core = 1000 / cpu_ms_per_call) and the efficiency measured from 1 to W
workers, compounded for each doubling past that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from bench.harness import Harness
from bench.measure import Settings, measure
from bench.report import ratio
from bench.scenarios import SCENARIOS, Point

MULTICORE = "multicore"  # its name in --scenarios
SCENARIO = "cache-hot"
POINT = Point(64)
CHANNELS_PER_WORKER = 8  # 16 connections: both workers get some, whatever the kernel's hash
GOAL_CALLS_PER_S = 10_000  # the seeds: "> 10,000 requests per second per node"
PROJECTED_CORES = (1, 2, 4, 16)
# Points of the same run projected with the efficiency measured here (their CPU per aggregate
# is that of one aggregator process pinned to one CPU, i.e. workers: 1).
ALSO_PROJECTED = ("flat5x20ms/c64",)
FORMULA = "calls/s(N) = N x 1000 / c1 x e^log2(N), e = min(1, c1 / cW)^(1 / log2(W))"
ASSUMPTIONS = (
    "N cores of this machine's speed, all for the aggregator: load generator and upstreams "
    "elsewhere",
    "c1 = CPU ms per aggregate of one worker; cW = the same summed over W workers (all worker "
    "processes counted)",
    "each doubling of the workers costs the per-aggregate CPU share measured from 1 to W "
    "(pessimistic past W if the cost was a one-off, optimistic if contention grows faster)",
    "no shared limit other than CPU: loopback, kernel and memory bandwidth as on this machine",
    "an aggregate is one request in the goal; the upstream requests it makes are not counted",
)
_FIGURES = (
    "calls",
    "calls_per_s",
    "p50_ms",
    "p99_ms",
    "cpu_ms_per_call",
    "server_cpu_util",
    "harness_cpu_util",
    "harness_cpu_ms_per_call",
    "other_cpu_util",
    "errors",
    "not_ok_results",
    "incomplete_calls",
)


def measure_multicore(
    harness: Harness,
    settings: Settings,
    workers: int,
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> dict[str, Any]:
    """bench-results.json's ``multicore``: both aggregators' figures, scaling, projection."""
    counts = (1, workers)
    sides = [harness.start_workers(count) for count in counts]
    before = {side: harness.servers[side].cpu_seconds_by_process() for side in sides}
    channels = CHANNELS_PER_WORKER * workers
    figures = measure(harness, SCENARIOS[SCENARIO], POINT, settings, sides, channels)
    shares = {
        str(count): _worker_shares(before[side], harness.servers[side].cpu_seconds_by_process())
        for count, side in zip(counts, sides, strict=True)
    }
    by_workers = {
        str(count): {name: figures[side][name] for name in _FIGURES}
        for count, side in zip(counts, sides, strict=True)
    }
    one, many = by_workers["1"], by_workers[str(workers)]
    cpus = harness.servers[sides[-1]].affinity()
    return {
        "scenario": f"{SCENARIO}/{POINT.key}",
        "workers": list(counts),
        "cpus": cpus,
        "connections": channels,
        "results": by_workers,
        "worker_cpu_share": shares,
        "throughput_scaling": ratio(many["calls_per_s"], one["calls_per_s"]),
        "cpu_per_call_efficiency": ratio(one["cpu_ms_per_call"], many["cpu_ms_per_call"]),
        "bias": _bias(many, workers, len(cpus or ()) or None),
        "projection": _projection(one, many, workers, results),
    }


def _worker_shares(before: dict[int, float], after: dict[int, float]) -> list[float]:
    """Each worker's share of the server CPU over the run (the parent, which only waits, is
    left out when it has workers): how evenly SO_REUSEPORT spread the connections."""
    used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    workers = list(used.values())[1:] or list(used.values())  # [0]: the parent
    total = sum(workers)
    return [round(seconds / total, 3) if total else 0.0 for seconds in sorted(workers)]


def _bias(many: Mapping[str, Any], workers: int, cpus: int | None) -> str:
    harness = many["harness_cpu_util"].get("total", 0.0)
    load_ms = many["harness_cpu_ms_per_call"].get("load")
    return (
        f"the load generator, upstreams and orchestrator share the aggregator's {cpus} CPUs "
        f"here: up to {harness:.2f} of a CPU during the workers: {workers} slices (the load "
        f"generator {load_ms} ms of CPU per aggregate, against the server's "
        f"{many['cpu_ms_per_call']}), so calls/s at {workers} workers is below what {workers} "
        "cores give the server alone; the projection uses CPU per aggregate, which the sharing "
        "does not lower (its context switches raise it a little: a pessimistic bias)"
    )


def _projection(
    one: Mapping[str, Any],
    many: Mapping[str, Any],
    workers: int,
    results: Mapping[str, Mapping[str, Mapping[str, Any]]],
) -> dict[str, Any]:
    c1, cw = one["cpu_ms_per_call"], many["cpu_ms_per_call"]
    efficiency = None
    if c1 and cw:
        efficiency = round(min(1.0, c1 / cw) ** (1 / math.log2(workers)), 3)
    per_scenario = {f"{SCENARIO}/{POINT.key}": c1}
    for key in ALSO_PROJECTED:
        if key in results:
            per_scenario[key] = results[key]["aggregator"]["cpu_ms_per_call"]
    return {
        "formula": FORMULA,
        "assumptions": list(ASSUMPTIONS),
        "efficiency_per_doubling": efficiency,
        "goal_calls_per_s": GOAL_CALLS_PER_S,
        "calls_per_s": {
            key: {str(n): _projected(n, c, efficiency) for n in PROJECTED_CORES}
            for key, c in per_scenario.items()
        },
        "cpu_ms_per_call_1_worker": per_scenario,
        "cores_for_goal": {key: _cores_for_goal(c, efficiency) for key, c in per_scenario.items()},
    }


def _projected(cores: int, c1: float | None, efficiency: float | None) -> float | None:
    if not c1 or efficiency is None:
        return None
    return round(cores * 1000 / c1 * float(efficiency ** math.log2(cores)))


def _cores_for_goal(c1: float | None, efficiency: float | None) -> float | None:
    """N where the formula reaches the goal: N^(1 + log2 e) = goal x c1 / 1000; None if never
    (each doubling losing half or more)."""
    if not c1 or not efficiency:
        return None
    exponent = 1 + math.log2(efficiency)
    if exponent <= 0:
        return None
    return round(float((GOAL_CALLS_PER_S * c1 / 1000) ** (1 / exponent)), 1)
