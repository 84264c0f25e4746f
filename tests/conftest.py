"""Fixtures: the real aggregator on loopback, wired to real upstreams that tests control."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.config import Config, config_from_mapping
from aggregator.lifecycle import AggregatorServer
from aggregator.timers import SYSTEM_CLOCK, Clock
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.upstreams import GrpcUpstream, RestUpstream, grpc_upstream, refused_port, rest_upstream

# docs/api.md: every call ends with all of these, on OK and on error.
TRAILER_KEYS = {
    "x-aggregate-completed",
    "x-aggregate-succeeded",
    "x-aggregate-failed",
    "x-aggregate-timed-out",
    "x-aggregate-fallback",
    "x-aggregate-deadline-ms",
    "x-aggregate-elapsed-ms",
    "x-aggregate-summary-bin",
}

StartServer = Callable[..., Awaitable[pb_grpc.AggregatorStub]]


@pytest.fixture
async def rest() -> AsyncIterator[RestUpstream]:
    async with rest_upstream() as upstream:
        yield upstream


@pytest.fixture
async def rpc() -> AsyncIterator[GrpcUpstream]:
    async with grpc_upstream() as upstream:
        yield upstream


def make_config(
    rest: RestUpstream,
    rpc: GrpcUpstream,
    server: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    aggregates: dict[str, Any] | None = None,
    limits: dict[str, Any] | None = None,
    **upstreams: Any,
) -> Config:
    """rest, rpc and a refused-port upstream ``dead``; keyword arguments add or override
    upstreams; ``aggregates`` is the config's named aggregates, ``limits`` its limits."""
    document: dict[str, Any] = {
        "server": {
            "address": "127.0.0.1:0",
            "metrics_address": "",
            "admin_address": "",
            **(server or {}),
        },
        "upstreams": {
            "rest": {"kind": "http", "url": rest.url},
            "rpc": {"kind": "grpc", "address": rpc.address},
            "dead": {"kind": "http", "url": f"http://127.0.0.1:{refused_port()}"},
            **upstreams,
        },
    }
    if auth is not None:
        document["auth"] = auth
    if aggregates is not None:
        document["aggregates"] = aggregates
    if limits is not None:
        document["limits"] = limits
    return config_from_mapping(document)


@pytest.fixture
async def start_server(
    rest: RestUpstream, rpc: GrpcUpstream
) -> AsyncIterator[Callable[..., Awaitable[tuple[AggregatorServer, pb_grpc.AggregatorStub]]]]:
    """Starts an aggregator with make_config(rest, rpc, ...); returns it and a stub to it."""
    servers: list[AggregatorServer] = []
    channels: list[grpc.aio.Channel] = []

    async def start(
        server: dict[str, Any] | None = None,
        auth: dict[str, Any] | None = None,
        aggregates: dict[str, Any] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        limits: dict[str, Any] | None = None,
        **upstreams: Any,
    ) -> tuple[AggregatorServer, pb_grpc.AggregatorStub]:
        config = make_config(rest, rpc, server, auth, aggregates, limits, **upstreams)
        aggregator = AggregatorServer(config, clock=clock)
        port = await aggregator.start()
        servers.append(aggregator)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return aggregator, pb_grpc.AggregatorStub(channel)

    yield start
    for channel in channels:
        await channel.close()
    for aggregator in servers:
        await aggregator.drain()


@pytest.fixture
async def stub(
    start_server: Callable[..., Awaitable[tuple[AggregatorServer, pb_grpc.AggregatorStub]]],
) -> pb_grpc.AggregatorStub:
    _, stub = await start_server()
    return stub


def http(target_id: str, path: str, upstream: str = "rest", **fields: Any) -> pb.Target:
    call_fields = {
        key: fields.pop(key)
        for key in ("method", "query", "headers", "body", "json")
        if key in fields
    }
    return pb.Target(
        id=target_id, http=pb.HttpCall(upstream=upstream, path=path, **call_fields), **fields
    )


def rpc_target(target_id: str, method: str, request: bytes = b"", **fields: Any) -> pb.Target:
    metadata = fields.pop("metadata", {})
    return pb.Target(
        id=target_id,
        grpc=pb.GrpcCall(
            upstream=fields.pop("upstream", "rpc"),
            method=f"/test.Upstream/{method}",
            request=request,
            metadata=metadata,
        ),
        **fields,
    )


async def collect(
    call: Any,
) -> tuple[list[pb.TargetResult], grpc.StatusCode, str, dict[str, Any]]:
    """Reads a whole Aggregate stream: results, status, details and trailers as a dict."""
    results: list[pb.TargetResult] = []
    try:
        async for result in call:
            results.append(result)
    except grpc.aio.AioRpcError:
        pass
    trailers = dict(await call.trailing_metadata() or ())
    return results, await call.code(), await call.details(), trailers


def ids(results: list[pb.TargetResult]) -> list[str]:
    return [result.id for result in results]


async def wait_for(queue: asyncio.Queue[None], timeout: float = 5.0) -> None:
    """Waits until an upstream reports an event (a hang started, a cancel arrived)."""
    async with asyncio.timeout(timeout):
        await queue.get()


@contextlib.asynccontextmanager
async def aggregator_process(config: Path, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """`aggregator serve --config CONFIG` in a child process (on uvloop, the serve default),
    ready when its health on ``port`` says SERVING; its log on ``stdout``; killed on the way
    out if still running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aggregator",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest()
            response = await health.Check(check, timeout=20, wait_for_ready=True)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


class Log:
    """A process's log (its stdout), read as it comes, so a busy server never blocks on a full
    pipe; ``next`` waits for the next line matching a pattern."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        self._stdout = process.stdout
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self._stdout.readline():
            self._lines.put_nowait(line.decode())
        self._lines.put_nowait("")

    async def next(self, pattern: str, timeout: float = 10) -> str:
        async with asyncio.timeout(timeout):
            while True:
                line = await self._lines.get()
                assert line, f"the process ended before logging {pattern!r}"
                if re.search(pattern, line):
                    return line

    async def aclose(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
