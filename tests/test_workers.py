"""server.workers: 2 processes share the port, both serve, metrics add up across them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import collect, http
from tests.upstreams import refused_port


def calls_per_worker(metrics_dir: Path) -> list[float]:
    totals = []
    for path in sorted(metrics_dir.glob("counter_*.db")):
        values = MmapedDict.read_all_values_from_file(str(path))
        totals.append(
            sum(
                value
                for key, value, _, _ in values
                if key.startswith('["aggregator_calls", "aggregator_calls_total"')
            )
        )
    return totals


async def test_two_workers_share_the_port_and_aggregate_metrics(tmp_path, rest):
    port, metrics_port = refused_port(), refused_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
server:
  address: "127.0.0.1:{port}"
  metrics_address: "127.0.0.1:{metrics_port}"
  workers: 2
  shutdown_grace: 2s
upstreams:
  rest: {{kind: http, url: "{rest.url}"}}
"""
    )
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aggregator", "serve", "--config", str(config),
        env=env, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        calls = 24
        for index in range(calls):
            # A channel per call: a new connection each time, spread by SO_REUSEPORT.
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=(("grpc.use_local_subchannel_pool", 1),)
            ) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                await health.Check(health_pb2.HealthCheckRequest(), timeout=20, wait_for_ready=True)
                stub = pb_grpc.AggregatorStub(channel)
                request = pb.AggregateRequest(targets=[http(f"t{index}", "/delay/1")])
                _, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
                assert code == grpc.StatusCode.OK
        per_worker = calls_per_worker(metrics_dir)
        assert len(per_worker) == 2
        assert all(count > 0 for count in per_worker), per_worker
        assert sum(per_worker) == calls

        url = f"http://127.0.0.1:{metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            text = await response.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        ok = [s.value for s in families["aggregator_calls"].samples if s.labels.get("code") == "OK"]
        assert sum(ok) == calls
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await process.wait() == 0
