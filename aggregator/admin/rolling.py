"""Each upstream's last minute: latency percentiles, error rate and cache hit ratio in fixed
memory (sixty one-second slots, each a log-scale latency histogram), whatever the traffic."""

from __future__ import annotations

import bisect
from typing import Any

WINDOW = 60  # seconds
# Histogram bin edges in nanoseconds: 0.1 ms to ~80 s, 15% apart (a percentile is read as its
# bin's upper edge, so it is at most 15% high).
EDGES: tuple[int, ...] = tuple(int(100_000 * 1.15**k) for k in range(98))


class _Second:
    __slots__ = ("at", "bins", "cache_hits", "cache_lookups", "count", "errors")

    def __init__(self) -> None:
        self.at = -1
        self.count = self.errors = self.cache_hits = self.cache_lookups = 0
        self.bins = [0] * (len(EDGES) + 1)

    def reset(self, at: int) -> None:
        self.at = at
        self.count = self.errors = self.cache_hits = self.cache_lookups = 0
        bins = self.bins
        for index in range(len(bins)):
            bins[index] = 0


class RollingStats:
    """One upstream's targets over the last ``WINDOW`` seconds (``now`` in whole seconds of any
    monotonic clock)."""

    __slots__ = ("_seconds", "_summary")

    def __init__(self) -> None:
        self._seconds = [_Second() for _ in range(WINDOW)]
        # The last summary and the second it was made in: however many pages poll, the
        # histograms are added up at most once a second (~0.2 ms an upstream); a summary is
        # at most a second old.
        self._summary: tuple[int, dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"<RollingStats {self.summary(max(s.at for s in self._seconds))}>"

    def add(self, now: int, latency_ns: int, failed: bool, cache: int) -> None:
        """One target: ``cache`` 0 when no cache was asked, 2 for a hit (CacheStatus)."""
        second = self._seconds[now % WINDOW]
        if second.at != now:
            second.reset(now)
        second.count += 1
        second.errors += failed
        if cache:
            second.cache_lookups += 1
            second.cache_hits += cache == 2
        second.bins[bisect.bisect_left(EDGES, latency_ns)] += 1

    def summary(self, now: int) -> dict[str, Any]:
        if self._summary is None or self._summary[0] != now:
            self._summary = (now, self._summarize(now))
        return self._summary[1]

    def _summarize(self, now: int) -> dict[str, Any]:
        return summary_of(self.window(now))

    def window(self, now: int) -> dict[str, Any]:
        """The last minute's counts and latency histogram (bin index: count, non-empty bins
        only): what another worker adds to its own to show the whole process group
        (admin/group.py)."""
        live = [s for s in self._seconds if now - WINDOW < s.at <= now]
        bins = [sum(column) for column in zip(*(s.bins for s in live), strict=True)] if live else []
        return {
            "targets": sum(s.count for s in live),
            "errors": sum(s.errors for s in live),
            "cache_hits": sum(s.cache_hits for s in live),
            "cache_lookups": sum(s.cache_lookups for s in live),
            "bins": {str(index): number for index, number in enumerate(bins) if number},
        }


def add_windows(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Several workers' windows of one upstream, as one."""
    total: dict[str, Any] = {"targets": 0, "errors": 0, "cache_hits": 0, "cache_lookups": 0}
    bins: dict[str, int] = {}
    for window in windows:
        for key in total:
            total[key] += window[key]
        for index, number in window["bins"].items():
            bins[index] = bins.get(index, 0) + number
    return {**total, "bins": bins}


def summary_of(window: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of a window: percentiles, error rate, cache hit ratio."""
    count, lookups = window["targets"], window["cache_lookups"]
    bins = [0] * (len(EDGES) + 1)
    for index, number in window["bins"].items():
        bins[int(index)] = number
    return {
        "targets": count,
        "p50_ms": _percentile(bins, count, 0.50),
        "p99_ms": _percentile(bins, count, 0.99),
        "error_rate": round(window["errors"] / count, 4) if count else None,
        "cache_hit_ratio": round(window["cache_hits"] / lookups, 4) if lookups else None,
    }


def _percentile(bins: list[int], count: int, fraction: float) -> float | None:
    if not count:
        return None
    rank = max(1, round(count * fraction))
    seen = 0
    for index, number in enumerate(bins):
        seen += number
        if seen >= rank:
            edge = EDGES[index] if index < len(EDGES) else EDGES[-1]
            return round(edge / 1e6, 3)
    return None  # pragma: no cover - the bins hold count targets
