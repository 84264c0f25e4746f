"""Whatever hostile request a caller sends (tests/adversarial/strategies.py), the real server
answers OK, a clean INVALID_ARGUMENT or a per-target error, never UNKNOWN/INTERNAL, and within
the loop-lag and RSS bounds (issue 23, "Build with it: an adversarial harness")."""

from __future__ import annotations

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from aggregator.v1 import aggregator_pb2 as pb
from tests.adversarial.conftest import Adversary, Answer, assert_clean, bounded
from tests.adversarial.strategies import SURFACES, Surface, hostile_requests


def observe(answer: Answer) -> None:
    """What the examples reached, for --hypothesis-show-statistics."""
    event(answer.code.name)
    for outcome in {pb.Outcome.Name(result.outcome) for result in answer.results}:
        event(outcome)


@bounded(60)
@given(request=hostile_requests())
async def test_a_hostile_request_is_answered_cleanly_within_the_bounds(
    adversary: Adversary, request: pb.AggregateRequest
) -> None:
    # What the rest upstream's /json answers is in the request's own query: counted there.
    answer = await adversary.call(request)
    assert_clean(request, answer)
    observe(answer)


@pytest.mark.parametrize("surface", SURFACES, ids=[s.__name__ for s in SURFACES])
@bounded(10)
@given(data=st.data())
async def test_each_surface_alone_is_answered_cleanly_within_the_bounds(
    adversary: Adversary, surface: Surface, data: st.DataObject
) -> None:
    request = pb.AggregateRequest(targets=data.draw(surface(0)))
    answer = await adversary.call(request)
    assert_clean(request, answer)
    observe(answer)
