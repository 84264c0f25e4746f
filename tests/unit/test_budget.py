"""RetryBudget on a fake clock: the ratio, the floor, and the 10 s window."""

from __future__ import annotations

from aggregator.policies.budget import RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def withdrawals(budget: RetryBudget, tries: int = 1000) -> int:
    return sum(budget.try_withdraw() for _ in range(tries))


def test_ratio_of_recent_requests_may_be_retried() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, clock=Clock())
    for _ in range(100):
        budget.record_request()
    assert withdrawals(budget) == 20


def test_floor_lets_a_quiet_upstream_retry() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=1, clock=Clock())
    assert withdrawals(budget) == 10  # 1/s over the 10 s window, with no requests at all


def test_requests_and_retries_leave_the_window() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.5, min_per_second=0, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert withdrawals(budget) == 5
    clock.now += 5
    assert withdrawals(budget) == 0  # still inside the window
    clock.now += 6
    assert withdrawals(budget) == 0  # the requests left too
    budget.record_request()
    budget.record_request()
    assert withdrawals(budget) == 1


def test_repr_shows_the_state() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, clock=Clock())
    for _ in range(10):
        budget.record_request()
    budget.try_withdraw()
    assert repr(budget) == "<RetryBudget [1 retries / 10 requests, ratio 0.2, floor 0]>"
