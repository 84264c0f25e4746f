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
from tests.conftest import Log, collect, http
from tests.upstreams import free_port


async def counted(metrics_dir: Path, calls: int) -> list[float]:
    """Calls per worker once all ``calls`` are counted: a worker counts a call just after
    answering it (call_soon), and across processes there is no event to wait on, so this polls,
    for at most 5 s."""
    async with asyncio.timeout(5):
        while sum(per_worker := calls_per_worker(metrics_dir)) < calls:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return per_worker


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
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
server:
  address: "127.0.0.1:{port}"
  metrics_address: "127.0.0.1:{metrics_port}"
  admin_address: ""
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
        calls = 0
        # Until both workers have served (the second may bind after the first already serves),
        # and at least 24 calls: bounded at 200.
        while calls < 24 or (min(calls_per_worker(metrics_dir)) == 0 and calls < 200):
            # A channel per call: a new connection each time, spread by SO_REUSEPORT.
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=(("grpc.use_local_subchannel_pool", 1),)
            ) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                await health.Check(health_pb2.HealthCheckRequest(), timeout=20, wait_for_ready=True)
                stub = pb_grpc.AggregatorStub(channel)
                request = pb.AggregateRequest(targets=[http(f"t{calls}", "/delay/1")])
                _, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
                assert code == grpc.StatusCode.OK
                calls += 1
        per_worker = await counted(metrics_dir, calls)
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


async def worker_kept(group_dir: Path) -> list[int]:
    """How many aggregates each worker keeps, asked on its own socket (admin/group.py)."""
    kept = []
    for index in range(2):
        connector = aiohttp.UnixConnector(path=str(group_dir / f"admin-{index}.sock"))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get("http://localhost/api/aggregates") as response,
        ):
            kept.append((await response.json())["kept"])
    return kept


async def test_every_worker_answers_the_admin_page_for_the_whole_group(tmp_path, rest):
    port, admin_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
server:
  address: "127.0.0.1:{port}"
  metrics_address: ""
  admin_address: "127.0.0.1:{admin_port}"
  workers: 2
  shutdown_grace: 2s
  config_check_interval: ""
upstreams:
  rest: {{kind: http, url: "{rest.url}"}}
"""
    )
    group_dir = tmp_path / "group"
    group_dir.mkdir(mode=0o700)
    env = {**os.environ, "AGGREGATOR_WORKERS_DIR": str(group_dir)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aggregator", "serve", "--config", str(config),
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    log = Log(process)
    try:
        calls, kept = 0, [0, 0]
        # Six calls at least, and until each worker has served some: bounded at 200.
        while calls < 6 or (min(kept) == 0 and calls < 200):
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=(("grpc.use_local_subchannel_pool", 1),)
            ) as channel:
                stub = pb_grpc.AggregatorStub(channel)
                request = pb.AggregateRequest(targets=[http(f"t{calls}", "/delay/1")])
                _, code, _, _ = await collect(
                    stub.Aggregate(request, timeout=20, wait_for_ready=True)
                )
                assert code == grpc.StatusCode.OK
                calls += 1
            # A worker records a call just after answering it: polled, across processes.
            async with asyncio.timeout(5):
                while sum(kept := await worker_kept(group_dir)) < calls:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        assert min(kept) > 0, kept
        # Each request on a new connection: SO_REUSEPORT hands them to either worker.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(8):
                url = f"http://127.0.0.1:{admin_port}/api/aggregates"
                async with session.get(url) as response:
                    answer = await response.json()
                assert (answer["kept"], len(answer["aggregates"]), answer["workers"]) == (
                    calls, calls, 2,
                )  # fmt: skip
                assert len({a["seq"] for a in answer["aggregates"]}) == calls
                newest = answer["aggregates"][0]
                detail = f"/api/aggregates/{newest['request_id']}?seq={newest['seq']}"
                async with session.get(f"http://127.0.0.1:{admin_port}{detail}") as response:
                    assert response.status == 200
                async with session.get(f"http://127.0.0.1:{admin_port}/api/upstreams") as response:
                    (row,) = (await response.json())["upstreams"]
                assert (row["name"], row["targets"], row["workers"]) == ("rest", calls, 2)
            # SIGHUP to the parent reaches both workers: both reload.
            process.send_signal(signal.SIGHUP)
            await log.next("config reloaded")
            await log.next("config reloaded")
            async with session.get(f"http://127.0.0.1:{admin_port}/api/config") as response:
                info = await response.json()
            assert info["same"]
            assert len(info["workers"]) == 2
            assert [w["last_reload"]["result"] for w in info["workers"]] == ["ok", "ok"]
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await process.wait() == 0
        await log.aclose()
