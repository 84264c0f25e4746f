"""Shared deadline timers, and the attempt timeout built on them: never early, one loop timer
per millisecond, and a caller's cancellation is never mistaken for a timeout."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from aggregator.config import config_from_mapping
from aggregator.errors import TargetFailure
from aggregator.metrics import Metrics
from aggregator.plan import HttpRequest
from aggregator.policies.endpoint import GuardedUpstream
from aggregator.policies.limits import Bulkhead
from aggregator.timers import Timers
from aggregator.upstreams import Reply
from aggregator.upstreams.fleet import Single
from aggregator.v1 import aggregator_pb2 as pb


async def test_a_deadline_fires_at_its_time_never_before():
    loop = asyncio.get_running_loop()
    timers = Timers()
    fired = asyncio.Event()
    when = loop.time() + 0.02
    fired_at: list[float] = []
    timer = timers.call_at(when, lambda: (fired_at.append(loop.time()), fired.set()))
    await fired.wait()
    assert fired_at[0] >= when
    assert timer.expired
    assert repr(timers) == "<Timers [0 deadlines in 0 buckets]>"


async def test_deadlines_in_the_same_millisecond_share_one_loop_timer():
    loop = asyncio.get_running_loop()
    timers = Timers()
    base = (int(loop.time() * 1000) + 50.1) / 1000  # early in a millisecond, 50 ms ahead
    done = asyncio.Event()
    order: list[int] = []
    for n in range(3):
        timers.call_at(base + n * 0.0002, lambda n=n: order.append(n))
    timers.call_at(base + 0.0015, done.set)  # the next millisecond: a bucket of its own
    assert repr(timers) == "<Timers [4 deadlines in 2 buckets]>"
    await done.wait()
    assert order == [0, 1, 2]


async def test_a_cancelled_deadline_never_fires_and_the_last_one_cancels_its_loop_timer():
    loop = asyncio.get_running_loop()
    timers = Timers()
    fired: list[str] = []
    when = loop.time() + 0.01  # once: two readings may fall in two millisecond buckets
    first = timers.call_at(when, lambda: fired.append("first"))
    second = timers.call_at(when, lambda: fired.append("second"))
    [bucket] = timers._buckets.values()
    handle = bucket.handle
    assert handle is not None
    first.cancel()
    assert not handle.cancelled()
    second.cancel()
    assert handle.cancelled()
    assert repr(timers) == "<Timers [0 deadlines in 0 buckets]>"
    later = asyncio.Event()
    timers.call_at(loop.time() + 0.02, later.set)
    await later.wait()
    assert fired == []


async def test_a_callback_may_cancel_another_deadline_of_its_bucket():
    loop = asyncio.get_running_loop()
    timers = Timers()
    done = asyncio.Event()
    when = loop.time() + 0.01
    fired: list[str] = []
    others: list = []
    timers.call_at(when, lambda: (fired.append("a"), others[0].cancel(), done.set()))
    others.append(timers.call_at(when, lambda: fired.append("b")))
    await done.wait()
    assert fired == ["a"]


# The attempt timeout: TIMEOUT when the upstream is too slow, CancelledError when the caller
# goes, and CancelledError when both happen in the same instant.

CONFIG = config_from_mapping(
    {"upstreams": {"slow": {"kind": "http", "url": "http://127.0.0.1:9", "timeout": "30ms"}}}
)


class _Hanging:
    """An upstream that never answers; ``called`` is set once a call is waiting."""

    name = "slow"

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def call(self, request: object, timeout: float, request_id: str) -> Reply:
        self.called.set()
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


def _endpoint(upstream: _Hanging, timers: Timers) -> GuardedUpstream:
    from prometheus_client import CollectorRegistry

    metrics = Metrics(CollectorRegistry(), CONFIG.upstreams)
    config = CONFIG.upstreams["slow"]
    all_upstreams = Bulkhead("all", 10, "x")
    return GuardedUpstream(
        Single(upstream), config, metrics.upstreams["slow"], all_upstreams, timers
    )


def _call(endpoint: GuardedUpstream) -> asyncio.Task:
    request = HttpRequest(method="GET", path="/", query=(), headers=(), body=None)
    deadline = asyncio.get_running_loop().time() + 5
    return asyncio.create_task(
        endpoint.call(
            request, idempotent=True, deadline=deadline, deadline_reason="x", request_id="r"
        )
    )


async def test_an_upstream_slower_than_its_timeout_is_a_timeout():
    endpoint = _endpoint(_Hanging(), Timers())
    answer = await _call(endpoint)
    assert answer.result.outcome == pb.OUTCOME_TIMEOUT
    assert "slow did not answer within upstream timeout 30ms" in answer.result.sentence


async def test_the_callers_cancellation_is_not_a_timeout():
    upstream = _Hanging()
    timers = Timers()
    task = _call(_endpoint(upstream, timers))
    await upstream.called.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert repr(timers) == "<Timers [0 deadlines in 0 buckets]>"


async def test_a_cancellation_in_the_instant_the_timeout_fires_is_still_a_cancellation():
    upstream = _Hanging()
    timers = Timers()
    task = _call(_endpoint(upstream, timers))
    await upstream.called.wait()
    [bucket] = timers._buckets.values()
    bucket.fire()  # the timeout, now
    task.cancel()  # and the caller, in the same loop iteration
    with pytest.raises(asyncio.CancelledError):
        await task


class _SwallowsThenFails:
    """Like grpc.aio: the cancel lands on an inner task that absorbs it, then the call fails."""

    name = "slow"

    async def call(self, request: object, timeout: float, request_id: str) -> Reply:
        async def invoke() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)

        await asyncio.create_task(invoke())
        raise TargetFailure(pb.OUTCOME_UNAVAILABLE, "slow is unavailable")

    async def aclose(self) -> None:
        pass


async def test_a_fired_timeout_is_taken_back_however_the_call_ends():
    endpoint = _endpoint(_SwallowsThenFails(), Timers())  # type: ignore[arg-type]

    async def target() -> tuple[int, int]:
        task = asyncio.current_task()
        assert task is not None
        request = HttpRequest(method="GET", path="/", query=(), headers=(), body=None)
        deadline = asyncio.get_running_loop().time() + 5
        answer = await endpoint.call(
            request, idempotent=True, deadline=deadline, deadline_reason="x", request_id="r"
        )
        assert answer.result.outcome == pb.OUTCOME_UNAVAILABLE
        return task.cancelling(), answer.attempts

    cancelling, attempts = await asyncio.create_task(target())
    assert (cancelling, attempts) == (0, 1)
