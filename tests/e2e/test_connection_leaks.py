"""Connections cancelled while connecting never stay in a pool, under asyncio and uvloop alike,
and aggregator_upstream_connections shows what the pools hold (issue 25 #1, #2).

Each test runs its own event loop of the kind it is given (the suite's loop is asyncio's), against
a real listener on loopback that never accepts: connects complete in the kernel's backlog, the
requests are never answered, and the callers cancel them at every point of their connect.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from aggregator.metrics import Metrics
from aggregator.upstreams.http1 import Pool

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {
    "asyncio": None,
    "uvloop": uvloop.new_event_loop,
}
REQUEST = b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n"
WAVE = 40  # requests started together, then cancelled together
# Turns of the loop before a wave is cancelled: 0 cancels before the TCP connect, the later ones
# inside create_connection (after connection_made, before the task resumes: uvloop's window),
# and while the request waits for its answer.
TURNS = range(12)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that takes connections (in the backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(WAVE * len(TURNS))
        yield int(listener.getsockname()[1])


def counts(metrics: Metrics) -> dict[str, float]:
    """aggregator_upstream_connections of upstream "rest", by state, as a scrape reads it."""
    samples = metrics.registry.get_sample_value
    return {
        state: samples("aggregator_upstream_connections", {"upstream": "rest", "state": state})
        or 0.0
        for state in ("idle", "busy")
    }


async def settled(metrics: Metrics, expected: dict[str, float], seconds: float = 2.0) -> bool:
    """Whether the gauge reads ``expected`` within ``seconds`` (closes are reported a turn or
    two of the loop after the cancellation)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while counts(metrics) != expected:
        if loop.time() > until:
            return False
        await asyncio.sleep(0.01)
    return True


async def cancel_waves(port: int) -> tuple[dict[str, float], dict[str, float], float]:
    """The gauge while a wave waits for its answers, after every wave was cancelled, and how
    long the pool then took to close."""
    metrics = Metrics(CollectorRegistry(), ["rest"])
    pool = Pool("127.0.0.1", port, connect_timeout=2.0, max_idle=WAVE)
    metrics.upstreams["rest"].connections.add(pool)

    def request() -> asyncio.Task[object]:
        coro = pool.request(REQUEST, head_only=False, cap=1024, idempotent=True)
        return asyncio.create_task(coro)

    waiting = [request() for _ in range(WAVE)]
    assert await settled(metrics, {"idle": 0.0, "busy": float(WAVE)}), counts(metrics)
    during = counts(metrics)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    for turns in TURNS:
        wave = [request() for _ in range(WAVE)]
        for _ in range(turns):
            await asyncio.sleep(0)
        for task in wave:
            task.cancel()
        await asyncio.gather(*wave, return_exceptions=True)
    await settled(metrics, {"idle": 0.0, "busy": 0.0})
    after = counts(metrics)
    started = time.monotonic()
    await pool.aclose()
    return during, after, time.monotonic() - started


@pytest.mark.parametrize("loop", LOOPS)
def test_cancelled_connects_leave_no_connection_in_the_pool(loop: str, silent_port: int) -> None:
    """Under uvloop a connect cancelled after connection_made, before its task resumed, closed
    the transport without a connection_lost: 80 of these 480 stayed in the pool for ever (and
    the gauge said so), and the pool's close waited its full 2 s for them."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        during, after, closing = runner.run(cancel_waves(silent_port))
    assert during == {"idle": 0.0, "busy": float(WAVE)}  # the gauge does count connections
    assert after == {"idle": 0.0, "busy": 0.0}
    assert closing < 0.5
