"""``python -m bench.admin``: the CPU an aggregate costs with the admin page on and off.

Two measures. End to end: one process runs a REST upstream, the aggregator (admin on, then
off, alternating rounds) and a client sending 10-target aggregates; CPU seconds per aggregate
(process time, so all three together: the difference between on and off is the recording's).
And the recording alone: ``Recent.record`` for one 10-target aggregate, in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import grpc
from aiohttp import web

from aggregator.admin.recent import Recent
from aggregator.call_record import CallRecord
from aggregator.config import config_from_mapping
from aggregator.fanout import Budget
from aggregator.lifecycle import AggregatorServer
from aggregator.plan import make_plan
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc

TARGETS = 10
CONCURRENCY = 8


async def _upstream() -> tuple[web.AppRunner, str]:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "path": request.path})

    app = web.Application()
    app.router.add_get("/items/{n}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _request() -> pb.AggregateRequest:
    return pb.AggregateRequest(
        targets=[
            pb.Target(id=f"t{n}", http=pb.HttpCall(upstream="u", path=f"/items/{n}"))
            for n in range(TARGETS)
        ]
    )


async def _round(url: str, admin: bool, calls: int) -> float:
    """CPU seconds per aggregate over ``calls`` aggregates (after a warm-up)."""
    config = config_from_mapping(
        {
            "server": {
                "address": "127.0.0.1:0",
                "metrics_address": "",
                "admin_address": "127.0.0.1:0" if admin else "",
            },
            "upstreams": {"u": {"kind": "http", "url": url, "max_concurrency": 100}},
        }
    )
    server = AggregatorServer(config)
    port = await server.start()
    request = _request()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AggregatorStub(channel)

            async def worker(count: int) -> None:
                for _ in range(count):
                    async for result in stub.Aggregate(request, timeout=5):
                        assert result.outcome == pb.OUTCOME_OK, result.error

            await asyncio.gather(*(worker(20) for _ in range(CONCURRENCY)))  # warm-up
            started = time.process_time()
            await asyncio.gather(*(worker(calls // CONCURRENCY) for _ in range(CONCURRENCY)))
            return (time.process_time() - started) / (calls // CONCURRENCY * CONCURRENCY)
    finally:
        await server.drain()


def _recording_alone(repeat: int) -> float:
    """Microseconds ``Recent.record`` takes for one 10-target aggregate."""
    config = config_from_mapping({"upstreams": {"u": {"kind": "http", "url": "http://h"}}})
    plan = make_plan(_request(), config)
    results = []
    for n in range(TARGETS):
        result = pb.TargetResult(id=f"t{n}", outcome=pb.OUTCOME_OK, http_status=200, attempts=1)
        result.start_offset.FromNanoseconds(100_000)
        result.latency.FromNanoseconds(2_000_000 + n)
        results.append(result)
    recent = Recent(500, ["u"])
    budget = Budget(seconds=5.0, started=0.0, stop_at=4.75)
    call = CallRecord("r", "ad_hoc", TARGETS, budget, plan=plan, reported=results)
    call.elapsed_ns = 3_000_000
    started = time.process_time()
    for n in range(repeat):
        call.request_id = f"r{n}"
        recent.record(call)
    return (time.process_time() - started) / repeat * 1e6


async def _main(calls: int, rounds: int) -> dict[str, Any]:
    runner, url = await _upstream()
    on: list[float] = []
    off: list[float] = []
    try:
        for _ in range(rounds):
            off.append(await _round(url, False, calls))
            on.append(await _round(url, True, calls))
    finally:
        await runner.cleanup()
    return {
        "cpu_us_per_aggregate_admin_off": round(statistics.median(off) * 1e6, 1),
        "cpu_us_per_aggregate_admin_on": round(statistics.median(on) * 1e6, 1),
        "record_us_per_aggregate": round(_recording_alone(20_000), 2),
        "targets": TARGETS,
        "calls_per_round": calls,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admin", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="aggregates a round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds each, on and off")
    args = parser.parse_args(argv)
    report = asyncio.run(_main(args.calls, args.rounds))
    for key, value in report.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
