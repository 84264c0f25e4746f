"""Live configuration (docs/operations.md, "Reloading the config"): real `aggregator serve`
processes reloading on SIGHUP and on a ConfigMap-style symlink swap, under load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc

from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import Log, aggregator_process, collect, http
from tests.upstreams import RestUpstream, free_port, rest_upstream


class ConfigMap:
    """A config file mounted as Kubernetes mounts a ConfigMap: ``config.yaml`` links to
    ``..data/config.yaml``, ``..data`` to a folder of the version; an update writes a new
    folder and swaps ``..data`` in one rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "config.yaml"
        self._version = 0

    def write(self, text: str) -> None:
        self._version += 1
        folder = self.root / f"..v{self._version}"
        folder.mkdir()
        (folder / "config.yaml").write_text(text)
        link = self.root / "..data_tmp"
        link.symlink_to(folder.name)
        os.replace(link, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/config.yaml")


def document(
    port: int, metrics_port: int, upstreams: str, extra: str = "", admin_port: int = 0
) -> str:
    admin = f"127.0.0.1:{admin_port}" if admin_port else ""
    return f"""
server:
  address: "127.0.0.1:{port}"
  metrics_address: "127.0.0.1:{metrics_port}"
  admin_address: "{admin}"
  shutdown_grace: 2s
  config_check_interval: 50ms
{extra}
upstreams:
{upstreams}
"""


@contextlib.asynccontextmanager
async def serving(path: Path, port: int) -> AsyncIterator[tuple[asyncio.subprocess.Process, Log]]:
    async with aggregator_process(path, port) as process:
        log = Log(process)
        try:
            yield process, log
        finally:
            await log.aclose()


async def metric(port: int, line_start: str) -> float | None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


async def calls(stub: pb_grpc.AggregatorStub, upstream: str, count: int) -> list[str]:
    """``count`` calls one after another; the status of each that was not OK."""
    failed = []
    for index in range(count):
        request = pb.AggregateRequest(targets=[http(f"t{index}", "/delay/2", upstream)])
        _, code, details, _ = await collect(stub.Aggregate(request, timeout=5))
        if code != grpc.StatusCode.OK:
            failed.append(f"{code.name}: {details}")
    return failed


def peers(upstream: RestUpstream) -> set[object]:
    return {seen["peer"] for seen in upstream.recorder.requests}


async def test_reload_under_load_fails_no_call_and_keeps_unchanged_connections(tmp_path, rest):
    port, metrics_port = free_port(), free_port()
    config = ConfigMap(tmp_path)
    async with rest_upstream() as busy:
        upstreams = (
            f'  rest: {{kind: http, url: "{rest.url}"}}\n'
            f'  busy: {{kind: http, url: "{busy.url}"}}\n'
            '  gone: {kind: http, url: "http://127.0.0.1:9"}\n'
        )
        config.write(document(port, metrics_port, upstreams))
        async with (
            serving(config.path, port) as (process, log),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = pb_grpc.AggregatorStub(channel)
            assert await calls(stub, "rest", 3) == []
            before = peers(rest)
            assert len(before) == 1
            # One caller one call after another on rest; four at once on busy.
            load = [asyncio.create_task(calls(stub, "rest", 150))] + [
                asyncio.create_task(calls(stub, "busy", 150)) for _ in range(4)
            ]
            process.send_signal(signal.SIGHUP)
            await log.next("config reloaded")
            # A new upstream, a removed one, a changed one (busy's timeout); rest unchanged.
            changed = upstreams.replace("  gone:", "  new:").replace(
                f'url: "{busy.url}"}}', f'url: "{busy.url}", timeout: 3s}}'
            )
            swapped_at = time.perf_counter()
            config.write(document(port, metrics_port, changed))
            line = await log.next("config reloaded")
            noticed = time.perf_counter() - swapped_at
            failed = [status for task in load for status in await task]
            assert failed == []
            # Every call through both reloads went over the connection opened before them.
            assert peers(rest) == before
            request = pb.AggregateRequest(targets=[http("t", "/delay/1", "gone")])
            _, code, details, _ = await collect(stub.Aggregate(request, timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert await metric(metrics_port, 'aggregator_config_reloads_total{result="ok"}') == 2
            print(f"file swap noticed and applied in {noticed * 1000:.0f} ms: {line.strip()}")


async def test_a_bad_file_changes_nothing_and_is_counted(tmp_path, rest):
    port, metrics_port, admin_port = free_port(), free_port(), free_port()
    config = ConfigMap(tmp_path)
    upstreams = f'  rest: {{kind: http, url: "{rest.url}"}}\n'
    good = document(port, metrics_port, upstreams, admin_port=admin_port)
    config.write(good)
    async with (
        serving(config.path, port) as (process, log),
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub = pb_grpc.AggregatorStub(channel)
        info = await _config_info(metrics_port)
        # A typo'd key and a bad value, and the rest upstream dropped: nothing of it applies.
        bad = document(
            port, metrics_port, "  other: {kind: http, url: nowhere, timout: 1s}\n",
            extra="  max_targets: many",
        )  # fmt: skip
        config.write(bad)
        assert "server.max_targets" in await log.next("config reload: server.max_targets")
        await log.next("config reload refused")
        assert await calls(stub, "rest", 2) == []
        assert await metric(metrics_port, 'aggregator_config_reloads_total{result="error"}') == 1
        assert await metric(metrics_port, 'aggregator_config_reloads_total{result="ok"}') == 0
        assert await _config_info(metrics_port) == info
        # The admin page shows the hash in force and the refused reload.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{admin_port}/api/config") as response,
        ):
            shown = await response.json()
        assert {shown["sha256"]} == info
        assert shown["last_reload"]["result"] == "error"
        assert shown["last_reload"]["problems"] >= 2
        assert shown["last_reload"]["sha256"] != shown["sha256"]
        # Looked at again and again, the same bad file is refused once, not every interval.
        process.send_signal(signal.SIGHUP)
        await log.next("config reload refused")
        assert await metric(metrics_port, 'aggregator_config_reloads_total{result="error"}') == 2


async def _config_info(metrics_port: int) -> set[str]:
    """The sha256 labels of aggregator_config_info at 1."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response,
    ):
        text = await response.text()
    return set(re.findall(r'aggregator_config_info\{sha256="([0-9a-f]{64})"\} 1\.0', text))


async def test_a_removed_upstreams_calls_in_flight_finish(tmp_path):
    port, metrics_port = free_port(), free_port()
    config = ConfigMap(tmp_path)
    async with rest_upstream() as old, rest_upstream() as kept:
        upstreams = (
            f'  old: {{kind: http, url: "{old.url}"}}\n  kept: {{kind: http, url: "{kept.url}"}}\n'
        )
        config.write(document(port, metrics_port, upstreams))
        async with (
            serving(config.path, port) as (_process, log),
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            stub = pb_grpc.AggregatorStub(channel)
            request = pb.AggregateRequest(targets=[http("slow", "/gate/a", "old")])
            running = asyncio.create_task(collect(stub.Aggregate(request, timeout=10)))
            await asyncio.wait_for(old.recorder.arrived.get(), 5)
            config.write(
                document(port, metrics_port, f'  kept: {{kind: http, url: "{kept.url}"}}\n')
            )
            await log.next("config reloaded")
            # New calls no longer reach it; the one running does, and ends OK.
            request = pb.AggregateRequest(targets=[http("new", "/delay/1", "old")])
            _, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert not running.done()
            old.recorder.gate.set()
            results, code, details, _ = await running
            assert code == grpc.StatusCode.OK, details
            assert results[0].outcome == pb.OUTCOME_OK
            await log.next("closed 1 upstreams retired by a reload")
