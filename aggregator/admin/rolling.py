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
        live = [s for s in self._seconds if now - WINDOW < s.at <= now]
        count = sum(s.count for s in live)
        lookups = sum(s.cache_lookups for s in live)
        bins = [sum(column) for column in zip(*(s.bins for s in live), strict=True)] if live else []
        return {
            "targets": count,
            "p50_ms": _percentile(bins, count, 0.50),
            "p99_ms": _percentile(bins, count, 0.99),
            "error_rate": round(sum(s.errors for s in live) / count, 4) if count else None,
            "cache_hit_ratio": (
                round(sum(s.cache_hits for s in live) / lookups, 4) if lookups else None
            ),
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
