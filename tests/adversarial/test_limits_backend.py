"""A slow Redis behind limits.backend cannot stall the loop (issue 24): with Redis paused
(SIGSTOP: its port accepts connections, nothing answers), every admission to a ``scope: global``
upstream gives up after limits.timeout and on_backend_error decides, under the loop watch."""

from __future__ import annotations

import asyncio
import signal
import time

from aggregator.v1 import aggregator_pb2 as pb
from tests.adversarial.conftest import StartServer
from tests.adversarial.watch import LoopWatch
from tests.conftest import collect, http
from tests.e2e.test_composition import redis_process
from tests.upstreams import RestUpstream


async def test_a_paused_redis_cannot_stall_the_loop(
    start_server: StartServer, rest: RestUpstream, watch: LoopWatch
) -> None:
    with redis_process() as (url, process):
        limits = {"backend": "redis", "redis_url": url, "on_backend_error": "local"}
        limit = {"rate": 1000, "burst": 1000, "scope": "global"}
        server, stub = await start_server(
            limits=limits, limited={"kind": "http", "url": rest.url, "rate_limit": limit}
        )
        request = pb.AggregateRequest(
            targets=[http(f"t{i}", "/echo/x", upstream="limited") for i in range(20)]
        )
        process.send_signal(signal.SIGSTOP)
        started = time.perf_counter()
        async with watch.span(request.ByteSize() * 30):
            answers = await asyncio.gather(
                *(collect(stub.Aggregate(request, timeout=5)) for _ in range(30))
            )
        # One limits.timeout (5ms), then Redis is skipped: not a socket timeout (1s) or more.
        assert time.perf_counter() - started < 1.0
        outcomes = {r.outcome for results, _, _, _ in answers for r in results}
        assert outcomes == {pb.OUTCOME_OK}  # the process's own limit admitted them
        errors = server.metrics.registry.get_sample_value("aggregator_limit_backend_errors_total")
        assert errors == 600  # every admission, none waited on Redis past the first timeout
