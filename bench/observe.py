"""``python -m bench.observe``: the CPU of observing one aggregate, in microseconds.

What runs after (and around) the calls of a 5-target REST aggregate that ended OK, as the
server runs it: per attempt the upstream's attempt counter and request duration
(policies/endpoint.py), per target its outcome counter (``Aggregation._report``), then the
call's ``AggregatorService._observe``: the call's counters and histograms, its one log line
(the text formatter, written to /dev/null) and the admin page's record. Also each part alone.
Process time, the minimum and median of ``--repeats`` rounds of ``--calls`` aggregates.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from aggregator.admin.recent import Recent
from aggregator.call_record import CallRecord
from aggregator.config import config_from_mapping
from aggregator.fanout import Aggregation, Budget
from aggregator.logs import configure
from aggregator.metrics import Metrics
from aggregator.plan import make_plan
from aggregator.server import AggregatorService, _log_call
from aggregator.v1 import aggregator_pb2 as pb

TARGETS = 5
UPSTREAMS = [f"u{n}" for n in range(TARGETS)]  # flat5x20ms: five targets, five upstreams


def _request() -> pb.AggregateRequest:
    return pb.AggregateRequest(
        targets=[
            pb.Target(id=f"t{n}", http=pb.HttpCall(upstream=f"u{n}", path=f"/items/{n}"))
            for n in range(TARGETS)
        ]
    )


def _results() -> list[pb.TargetResult]:
    results = []
    for n in range(TARGETS):
        result = pb.TargetResult(id=f"t{n}", outcome=pb.OUTCOME_OK, http_status=200, attempts=1)
        result.start_offset.FromNanoseconds(100_000 + n)
        result.latency.FromNanoseconds(20_500_000 + 1000 * n)
        results.append(result)
    return results


class _Observed:
    """What one aggregate's observation touches: metrics, the record and a log handler."""

    def __init__(self, admin: bool = True) -> None:
        config = config_from_mapping(
            {"upstreams": {name: {"kind": "http", "url": "http://h"} for name in UPSTREAMS}}
        )
        self.plan = make_plan(_request(), config)
        self.results = _results()
        self.metrics = Metrics(CollectorRegistry(), UPSTREAMS)
        self.service: Any = SimpleNamespace(
            _metrics=self.metrics, recent=Recent(500, UPSTREAMS) if admin else None
        )
        self.aggregation: Any = SimpleNamespace(
            reported={},
            unsent=set(),
            _by_id={t.id: t for t in self.plan.targets},
            _endpoints={
                name: SimpleNamespace(metrics=self.metrics.upstream(name)) for name in UPSTREAMS
            },
        )
        self.reply = SimpleNamespace(ok=True)

    def call(self, request_id: str) -> CallRecord:
        budget = Budget(seconds=5.0, started=0.0, stop_at=4.75)
        call = CallRecord(request_id, "ad_hoc", TARGETS, budget, plan=self.plan)
        call.reported = self.results
        call.elapsed_ns, call.first_at_ns, call.fanin_ns = 21_300_000, 1, 400_000
        return call

    def attempts(self) -> None:
        """What policies/endpoint.py counts of each target's one attempt."""
        for name in UPSTREAMS:
            upstream = self.metrics.upstream(name)
            upstream.attempted("first", self.reply)
            upstream.request_duration.observe(0.0205)

    def reports(self) -> None:
        for result in self.results:
            Aggregation._report(self.aggregation, result)

    def observe(self, call: CallRecord) -> None:
        AggregatorService._observe(self.service, call)


def _timed(body: Callable[[int], None], calls: int, repeats: int) -> tuple[float, float]:
    rounds = []
    for _ in range(repeats):
        started = time.process_time()
        body(calls)
        rounds.append((time.process_time() - started) / calls * 1e6)
    return min(rounds), statistics.median(rounds)


def measure(calls: int = 5000, repeats: int = 7) -> dict[str, tuple[float, float]]:
    """(min, median) microseconds per 5-target aggregate, of the whole and of each part."""
    null = open(os.devnull, "w")  # noqa: SIM115 - closed below
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure("text")  # as the server logs: its handler and module switches, to /dev/null
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(null)
    try:
        return _measure(calls, repeats)
    finally:
        root.handlers[:], root.level = saved
        null.close()


def _measure(calls: int, repeats: int) -> dict[str, tuple[float, float]]:
    whole, no_admin = _Observed(), _Observed(admin=False)
    made = [whole.call(f"{n:032x}") for n in range(calls)]

    def all_of(count: int) -> None:
        for call in made[:count]:
            whole.attempts()
            whole.reports()
            whole.observe(call)

    def metrics_only(count: int) -> None:
        for call in made[:count]:
            no_admin.attempts()
            no_admin.reports()
            AggregatorService._observe(no_admin.service, call)

    def record_only(count: int) -> None:
        recent = whole.service.recent
        for call in made[:count]:
            recent.record(call)

    def log_line_only(count: int) -> None:
        for call in made[:count]:
            _log_call(call, call.reported, 800_000, "t4")

    logging.getLogger("aggregator").disabled = False
    report = {"observe_all": _timed(all_of, calls, repeats)}
    report["record"] = _timed(record_only, calls, repeats)
    report["log_line"] = _timed(log_line_only, calls, repeats)
    logging.getLogger("aggregator").disabled = True  # metrics alone: no line, no record
    try:
        report["metrics"] = _timed(metrics_only, calls, repeats)
    finally:
        logging.getLogger("aggregator").disabled = False
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.observe", description=__doc__)
    parser.add_argument("--calls", type=int, default=5000, help="aggregates a round")
    parser.add_argument("--repeats", type=int, default=7, help="rounds")
    args = parser.parse_args(argv)
    for key, (low, median) in measure(args.calls, args.repeats).items():
        print(f"{key}_us: min {low:.1f} median {median:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
