"""The harness's watch: how long the event loop stalled and how far the process's memory grew
while a span of a test ran (docs/security.md, "The adversarial harness").

The server runs in the test's own process and on its event loop, so a ticker task on that loop
sees every stall the server causes, and the process's resident memory is the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024

# The longest the loop may stall. The invariant is "never stall the loop for other callers";
# 100 ms is what a caller would notice. 150 ms because CI is a loaded 2-core box: measured
# there (load 5-11), the hostile requests stall under 20 ms (median 0), the growth shapes'
# largest JSON bodies 80-100 ms; time the loop's thread spent waiting for a CPU does not count
# (see Ticker). The known findings stall 340 ms to 2 s, well past it either way.
LOOP_LAG_BOUND = 0.150
# How often the ticker wakes: short enough that a stall of the bound is many ticks long.
TICK = 0.010
# Resident memory a span may add whatever it does: the server's lazily built caches, grpc's
# buffers, the allocator's arenas and the test's own objects.
RSS_SLACK = 64 * MIB
# And per byte the span's call reads (the request, and the answers its upstreams give): a
# request becomes Python and protobuf objects, a JSON body a dict and its text, an answer its
# bytes, a TargetResult and the caller's copy. 32x is generous: measured, no harness request
# grew RSS by more than 1 MiB, while finding #1 grows it 128-186 MiB from 1 MB read.
RSS_PER_BYTE = 32

_PAGE = os.sysconf("SC_PAGE_SIZE")
_STATM = Path("/proc/self/statm")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SCHEDSTAT = Path("/proc/thread-self/schedstat")


class BoundExceeded(AssertionError):
    """A span broke one of the harness's bounds (the known findings' tests xfail on this)."""


class LoopStalled(BoundExceeded):
    pass


class MemoryGrew(BoundExceeded):
    pass


def resident_bytes() -> int:
    """The process's resident set now (statm's second field, in pages)."""
    return int(_STATM.read_text().split()[1]) * _PAGE


def queued() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (0 where unknown)."""
    try:
        return int(_SCHEDSTAT.read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _reset_peak() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_bytes() -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Ticker:
    """A task on the loop that sleeps TICK and records how late it woke.

    Lateness counts except the time the loop's thread waited for a CPU (the kernel's run-queue
    wait, /proc/thread-self/schedstat): a box busy with other processes delays the ticker
    without this process doing anything, and that is not a stall the server caused. Work on
    the loop, a blocking call on it, or waiting for a thread that holds the GIL all count.
    Where schedstat is missing the whole lateness counts. The raw lateness is kept too, for
    the failure message."""

    longest: float = 0.0  # seconds, the longest stall as counted
    longest_wall: float = 0.0
    peak_rss: int = 0  # sampled each tick, where the kernel's peak mark cannot be reset
    ticks: int = 0

    def __repr__(self) -> str:
        return (
            f"<Ticker [{self.ticks} ticks, longest stall {self.longest * 1000:.0f} ms "
            f"({self.longest_wall * 1000:.0f} ms wall)]>"
        )

    async def run(self) -> None:
        while True:
            wall, waited = time.perf_counter(), queued()
            await asyncio.sleep(TICK)
            late = time.perf_counter() - wall - TICK
            self.longest = max(self.longest, late - (queued() - waited))
            self.longest_wall = max(self.longest_wall, late)
            self.peak_rss = max(self.peak_rss, resident_bytes())
            self.ticks += 1


@dataclass
class Span:
    """What one watched span saw."""

    allowed_bytes: int  # RSS growth allowed: RSS_SLACK + RSS_PER_BYTE x the bytes read
    stall: float = 0.0
    stall_wall: float = 0.0
    growth: int = 0
    elapsed: float = 0.0

    def problems(self) -> list[BoundExceeded]:
        found: list[BoundExceeded] = []
        if self.stall > LOOP_LAG_BOUND:
            found.append(
                LoopStalled(
                    f"the event loop stalled {self.stall * 1000:.0f} ms "
                    f"({self.stall_wall * 1000:.0f} ms wall), over "
                    f"LOOP_LAG_BOUND ({LOOP_LAG_BOUND * 1000:.0f} ms)"
                )
            )
        if self.growth > self.allowed_bytes:
            found.append(
                MemoryGrew(
                    f"RSS grew {self.growth / MIB:.1f} MiB, over the "
                    f"{self.allowed_bytes / MIB:.1f} MiB the bytes read justify"
                )
            )
        return found


@dataclass
class LoopWatch:
    """Opens watched spans: ``async with watch.span(read_bytes): ...`` raises BoundExceeded on
    the way out when the loop stalled past LOOP_LAG_BOUND or RSS grew past
    RSS_SLACK + RSS_PER_BYTE x ``read_bytes``. Spans are opened only while the loop runs the
    test: between a test's steps (a fixture, a Hypothesis example) the loop is stopped, and
    a ticker would take that pause for a stall."""

    spans: list[Span] = field(default_factory=list)

    def __repr__(self) -> str:
        worst = max((span.stall for span in self.spans), default=0.0)
        return f"<LoopWatch [{len(self.spans)} spans, longest stall {worst * 1000:.0f} ms]>"

    @contextlib.asynccontextmanager
    async def span(self, read_bytes: int) -> AsyncIterator[Span]:
        span = Span(allowed_bytes=RSS_SLACK + RSS_PER_BYTE * read_bytes)
        self.spans.append(span)
        ticker = Ticker()
        base = resident_bytes()
        exact_peak = _reset_peak()
        started = time.perf_counter()
        task = asyncio.create_task(ticker.run(), name="loop watch")
        try:
            await asyncio.sleep(0)  # the ticker's first sleep starts before the span's work
            yield span
            await asyncio.sleep(TICK * 2)  # a stall that just ended is recorded too
        finally:
            task.cancel()
            await asyncio.wait([task])  # the ticker's own CancelledError stays in it
            if not task.cancelled() and task.exception() is not None:
                raise AssertionError("the loop watch's ticker failed") from task.exception()
            span.elapsed = time.perf_counter() - started
            span.stall, span.stall_wall = ticker.longest, ticker.longest_wall
            peak = max(ticker.peak_rss, resident_bytes(), _peak_bytes() if exact_peak else 0)
            span.growth = peak - base
        problems = span.problems()
        if len(problems) == 1:
            raise problems[0]
        if problems:
            raise BoundExceeded("; ".join(str(problem) for problem in problems))
