"""Bulkhead: the bound holds, waiters are served in order, and give-ups never leak a slot."""

from __future__ import annotations

import asyncio

import pytest

from aggregator.errors import TargetFailure
from aggregator.policies.limits import Bulkhead
from aggregator.v1 import aggregator_pb2 as pb


async def test_waiters_get_released_slots_in_order_and_the_bound_holds():
    bulkhead = Bulkhead("b", 1, "full")
    deadline = asyncio.get_running_loop().time() + 5
    await bulkhead.acquire(deadline)
    order: list[int] = []

    async def waiter(n: int) -> None:
        await bulkhead.acquire(deadline)
        order.append(n)
        assert bulkhead.inflight == 1

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)  # let them queue
    assert repr(bulkhead) == "<Bulkhead b [1/1 in flight, 3 waiting]>"
    for expected in range(3):
        bulkhead.release()
        await asyncio.sleep(0)
        assert order == list(range(expected + 1))
    await asyncio.gather(*tasks)
    bulkhead.release()
    assert repr(bulkhead) == "<Bulkhead b [0/1 in flight, 0 waiting]>"


async def test_a_waiter_past_its_deadline_is_rejected_and_leaves_no_trace():
    bulkhead = Bulkhead("b", 1, "no slot in time")
    now = asyncio.get_running_loop().time()
    await bulkhead.acquire(now + 5)
    with pytest.raises(TargetFailure) as rejected:
        await bulkhead.acquire(now + 0.01)
    assert rejected.value.outcome == pb.OUTCOME_REJECTED
    assert rejected.value.sentence == "no slot in time"
    bulkhead.release()
    assert repr(bulkhead) == "<Bulkhead b [0/1 in flight, 0 waiting]>"


async def test_a_slot_handed_to_a_waiter_that_was_just_cancelled_is_passed_on():
    bulkhead = Bulkhead("b", 1, "full")
    deadline = asyncio.get_running_loop().time() + 5
    await bulkhead.acquire(deadline)
    first = asyncio.create_task(bulkhead.acquire(deadline))
    second = asyncio.create_task(bulkhead.acquire(deadline))
    await asyncio.sleep(0)
    bulkhead.release()  # hands the slot to `first`...
    first.cancel()  # ...which is cancelled before it runs again
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.wait_for(second, 1)  # so the slot went on to `second`
    assert bulkhead.inflight == 1
    bulkhead.release()
    assert bulkhead.inflight == 0
