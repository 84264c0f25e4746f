"""Runs one scenario at one load level: warm-up, then rounds alternating the sides.

Round r runs the point's sides (SIDES, and FLOOR at FLOOR_CONCURRENCY) rotated by r (A B C, B C
A, C A B, ...), each for one slice of load; a side's figures are pooled over its slices. Server
CPU is read from /proc right around each slice (the server's process and its workers), so it
covers that side's own work and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.harness import Harness
from bench.procs import machine_busy_seconds
from bench.scenarios import Point, Scenario


@dataclass(frozen=True, slots=True)
class Settings:
    """How hard to push: ``quick`` shrinks every slice to a smoke test."""

    quick: bool = False

    def rounds(self, scenario: Scenario) -> int:
        return 1 if self.quick else scenario.rounds

    def seconds(self, point: Point) -> float:
        return 0.2 if self.quick else point.seconds

    def max_calls(self, point: Point) -> int:
        return min(point.max_calls, 4) if self.quick else point.max_calls

    def warmup_calls(self, scenario: Scenario, point: Point) -> int:
        if scenario.warmup_max_calls is not None:
            return scenario.warmup_max_calls
        return 2 if self.quick else max(2 * point.concurrency, 10)


@dataclass
class SideRun:
    """A side's slices at one point, pooled."""

    latency: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    harness_cpu_util: dict[str, float] = field(default_factory=dict)  # highest of any slice
    harness_cpu_s: dict[str, float] = field(default_factory=dict)  # summed over the slices
    other_cpu_util: float = 0.0  # the same, for everything on the machine that is not ours
    errors: dict[str, int] = field(default_factory=dict)
    not_ok: dict[str, int] = field(default_factory=dict)
    not_ok_sample: str = ""
    incomplete: int = 0
    peak_rss_mb: float = 0.0
    rss_before_mb: float = 0.0

    def add(
        self,
        answer: dict[str, Any],
        server_cpu_s: float,
        harness_cpu_s: dict[str, float],
        other_cpu_s: float,
    ) -> None:
        self.latency += answer["latency_ms"]
        self.first += answer["first_ms"]
        self.overhead += [
            total - slowest
            for total, slowest in zip(
                answer["latency_ms"], answer["slowest_upstream_ms"], strict=True
            )
        ]
        self.wall_s += answer["wall_s"]
        self.server_cpu_s += server_cpu_s
        harness_cpu_s = {**harness_cpu_s, "total": sum(harness_cpu_s.values())}
        for name, seconds in harness_cpu_s.items():
            self.harness_cpu_s[name] = self.harness_cpu_s.get(name, 0.0) + seconds
            util = seconds / answer["wall_s"]
            self.harness_cpu_util[name] = max(self.harness_cpu_util.get(name, 0.0), util)
        self.other_cpu_util = max(self.other_cpu_util, other_cpu_s / answer["wall_s"])
        for code, count in answer["errors"].items():
            self.errors[code] = self.errors.get(code, 0) + count
        for outcome, count in answer["not_ok"].items():
            self.not_ok[outcome] = self.not_ok.get(outcome, 0) + count
        self.not_ok_sample = self.not_ok_sample or answer["not_ok_sample"]
        self.incomplete += answer["incomplete"]

    def summary(self, targets: int) -> dict[str, Any]:
        calls = len(self.latency)
        latency, overhead = sorted(self.latency), sorted(self.overhead)
        summary = {
            "calls": calls,
            "calls_per_s": _round(calls / self.wall_s if self.wall_s else 0.0, 1),
            "p50_ms": _percentile(latency, 50),
            "p99_ms": _percentile(latency, 99),
            "p999_ms": _percentile(latency, 99.9),
            "overhead_p50_ms": _percentile(overhead, 50),
            "overhead_p99_ms": _percentile(overhead, 99),
            "first_result_p50_ms": _percentile(sorted(self.first), 50),
            "cpu_ms_per_call": _round(1000 * self.server_cpu_s / calls if calls else None, 3),
            "cpu_us_per_target": _round(
                1e6 * self.server_cpu_s / (calls * targets) if calls else None, 1
            ),
            "peak_rss_mb": _round(self.peak_rss_mb, 1),
            "server_cpu_util": _round(self.server_cpu_s / self.wall_s if self.wall_s else 0, 2),
            # Upstreams + load generator share the harness CPUs: near 1.0 per CPU, they may be
            # what limits throughput rather than the side under test.
            "harness_cpu_util": {k: round(v, 2) for k, v in self.harness_cpu_util.items()},
            # What making the load cost per aggregate (load generator, upstreams, orchestrator).
            "harness_cpu_ms_per_call": {
                k: round(1000 * v / calls, 3) if calls else None
                for k, v in self.harness_cpu_s.items()
            },
            # CPU used meanwhile by processes that are not the benchmark's: other jobs on the
            # machine. Above ~0.1 the figures are noisy.
            "other_cpu_util": _round(self.other_cpu_util, 2),
            "errors": self.errors,
            "not_ok_results": self.not_ok,
            "not_ok_sample": self.not_ok_sample,
            "incomplete_calls": self.incomplete,
        }
        if targets >= 100:
            growth_kb = (self.peak_rss_mb - self.rss_before_mb) * 1024
            summary["rss_growth_kb_per_target"] = _round(max(growth_kb, 0.0) / targets, 2)
        return summary


def measure(
    harness: Harness,
    scenario: Scenario,
    point: Point,
    settings: Settings,
    sides: Sequence[str] = (),
    channels: int = 1,
) -> dict[str, dict[str, Any]]:
    """The point's sides (or ``sides``: harness server names), each driven through
    ``channels`` connections."""
    sides = sides or point.sides
    runs = {side: SideRun() for side in sides}
    for side in sides:
        server = harness.servers[side]
        runs[side].rss_before_mb = server.memory_mb("VmRSS")
        harness.peak_rss_resets &= server.reset_peak_rss()
        _slice(harness, scenario, point, side, settings, channels, warmup=True)
    for round_ in range(settings.rounds(scenario)):
        for side in _rotated(sides, round_):
            before = _cpu_counters(harness, side)
            answer = _slice(harness, scenario, point, side, settings, channels, warmup=False)
            used = {
                name: seconds - before[name]
                for name, seconds in _cpu_counters(harness, side).items()
            }
            server_cpu, machine_cpu = used.pop("server"), used.pop("machine")
            other_cpu = max(0.0, machine_cpu - server_cpu - sum(used.values()))
            runs[side].add(answer, server_cpu, used, other_cpu)
    for side in sides:
        runs[side].peak_rss_mb = harness.servers[side].memory_mb("VmHWM")
    return {side: runs[side].summary(len(scenario.calls)) for side in sides}


def _slice(
    harness: Harness,
    scenario: Scenario,
    point: Point,
    side: str,
    settings: Settings,
    channels: int,
    warmup: bool,
) -> dict[str, Any]:
    seconds = 0.5 if warmup and not settings.quick else settings.seconds(point)
    max_calls = settings.warmup_calls(scenario, point) if warmup else settings.max_calls(point)
    command = {
        "scenario": scenario.name,
        "side": side,
        "concurrency": point.concurrency,
        "max_calls": max_calls,
        "seconds": seconds,
        "warmup": warmup,
        "channels": channels,
    }
    # Calls in flight when the time is up still finish: allow them the caller's deadline.
    return harness.run_slice(command, timeout=seconds + 2 * scenario.timeout + 30)


def _cpu_counters(harness: Harness, side: str) -> dict[str, float]:
    """CPU seconds so far: the side's server, each harness process, the whole machine."""
    return {
        "server": harness.servers[side].cpu_seconds(),
        **harness.harness_cpu_seconds(),
        "machine": machine_busy_seconds(),
    }


def _rotated(sides: Sequence[str], by: int) -> list[str]:
    by %= len(sides)
    return [*sides[by:], *sides[:by]]


def _percentile(ordered: Sequence[float], pct: float) -> float | None:
    """Linear interpolation between closest ranks; None without samples."""
    if not ordered:
        return None
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return _round(ordered[low] + (ordered[high] - ordered[low]) * (rank - low), 3)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
