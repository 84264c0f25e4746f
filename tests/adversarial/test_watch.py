"""The harness's own checks can fail: a stall, memory kept or memory spiked inside a span fails
it, and the ticker leaves no task behind (issue 23, "Build with it: an adversarial harness")."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from aggregator.v1 import aggregator_pb2 as pb
from tests.adversarial import watch as watch_module
from tests.adversarial.conftest import Adversary, assert_clean
from tests.adversarial.watch import (
    LOOP_LAG_BOUND,
    MIB,
    RSS_SLACK,
    BoundExceeded,
    LoopStalled,
    LoopWatch,
    MemoryGrew,
)
from tests.conftest import http


async def stall(watch: LoopWatch, busy: bool) -> None:
    """Holds the loop for twice the bound inside a span: computing, or blocked in a call."""
    async with watch.span(0):
        if busy:
            until = time.thread_time() + LOOP_LAG_BOUND * 2  # CPU time: a busy box stretches it
            while time.thread_time() < until:
                pass
        else:
            time.sleep(LOOP_LAG_BOUND * 2)  # noqa: ASYNC251 - the stall under test


@pytest.mark.parametrize("busy", [True, False], ids=["computing", "blocked"])
async def test_a_stall_on_the_loop_fails_the_span(watch: LoopWatch, busy: bool) -> None:
    with pytest.raises(LoopStalled, match="the event loop stalled"):
        await stall(watch, busy)
    assert watch.spans[-1].stall > LOOP_LAG_BOUND


BEYOND_SLACK = RSS_SLACK + 32 * MIB


async def allocate(watch: LoopWatch, read_bytes: int) -> int:
    """Allocates (and touches) BEYOND_SLACK bytes in a span, 8 MiB at a time so the loop never
    stalls long."""
    async with watch.span(read_bytes):
        memory = []
        for _ in range(BEYOND_SLACK // (8 * MIB)):
            memory.append(b"x" * 8 * MIB)
            await asyncio.sleep(0)
        await asyncio.sleep(0.02)
    return sum(map(len, memory))


async def test_memory_kept_past_the_allowance_fails_the_span(watch: LoopWatch) -> None:
    with pytest.raises(MemoryGrew, match="RSS grew"):
        await allocate(watch, 0)
    # Past the allowance (the allocation may reuse pages the process already held, so less
    # than all of BEYOND_SLACK may show as growth).
    span = watch.spans[-1]
    assert span.growth > span.allowed_bytes


async def spike(watch: LoopWatch) -> None:
    """BEYOND_SLACK bytes allocated and freed between two ticks."""
    async with watch.span(0):
        memory = b"x" * BEYOND_SLACK
        del memory


async def test_a_spike_freed_at_once_still_counts(watch: LoopWatch) -> None:
    """The kernel's peak mark sees an allocation no tick could sample (the allocation may
    stall the loop too, on a busy box)."""
    with pytest.raises(BoundExceeded, match="RSS grew"):
        await spike(watch)


async def test_the_allowance_grows_with_the_bytes_read(watch: LoopWatch) -> None:
    await allocate(watch, 8 * MIB)


async def test_the_ticker_leaves_no_task_behind(watch: LoopWatch) -> None:
    async with watch.span(0):
        assert any(task.get_name() == "loop watch" for task in asyncio.all_tasks())
    assert not any(task.get_name() == "loop watch" for task in asyncio.all_tasks())
    assert watch.spans[-1].stall < LOOP_LAG_BOUND


async def test_an_ordinary_call_is_well_inside_the_bounds(adversary: Adversary) -> None:
    request = pb.AggregateRequest(targets=[http("a", "/echo/a"), http("b", "/delay/20")])
    answer = await adversary.call(request)
    assert answer.code == grpc.StatusCode.OK
    assert_clean(request, answer)
    assert answer.span.growth < RSS_SLACK


async def test_a_ticker_that_fails_fails_the_span(
    watch: LoopWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch whose ticker died would see no stall at all: that fails the span instead."""

    def broken() -> float:
        raise RuntimeError("no schedstat")

    monkeypatch.setattr(watch_module, "queued", broken)
    with pytest.raises(AssertionError, match="ticker failed"):
        await stall(watch, busy=False)
