"""Issue 23 findings #1, #3, #7 and the structured problems of issue 20, against real servers on
loopback: a request's cost is counted before it is spent (the loop never stalls, memory does not
grow with the product of a value and its references), problems name no values, and each problem
reaches the caller as a google.rpc.BadRequest field violation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from aiohttp import web
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2, status_pb2

from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http

BIG = 1_000_000  # characters of the dependency's string
# The loop's longest stall allowed: generous, as the 1 MB answer itself is read, relayed to the
# caller and read by the test's client on this same loop (the unfixed stalls are seconds long).
MAX_STALL = 0.25
# ... and beside a request planned on the decoder's thread: the loop then waits for the GIL at
# each hand-over (5 ms each, more on a loaded machine; decoding.py measured 56-87 ms beside
# 1 MiB decodes). Unfixed, this request stalled the loop 1.8 s here.
MAX_STALL_BESIDE_THREAD = 0.5


class LoopWatch:
    """A task that wakes every 5 ms and records how late it woke (the loop's stall) and the
    largest resident set size seen meanwhile."""

    def __init__(self) -> None:
        self.worst_lag = 0.0
        self.peak_rss = self.rss()
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    async def __aenter__(self) -> LoopWatch:
        self.start_rss = self.rss()
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # our own task, cancelled just now
            await self._task

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            self.worst_lag = max(self.worst_lag, time.perf_counter() - before - 0.005)
            self.peak_rss = max(self.peak_rss, self.rss())

    @property
    def grown_mb(self) -> float:
        return (self.peak_rss - self.start_rss) / 1e6


@pytest.fixture
async def big() -> AsyncIterator[str]:
    """An HTTP upstream answering /big with {"s": "a" * 1,000,000}, recording other paths."""
    body = json.dumps({"s": "a" * BIG}).encode()
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/big":
            return web.Response(body=body, content_type="application/json")
        seen.append(request.path)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _value(raw: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if isinstance(raw, list):
        value.list_value.extend(raw)
    else:
        value.struct_value.update(raw)
    return value


async def _run(stub: Any, *targets: pb.Target, **kwargs: Any) -> Any:
    return await collect(stub.Aggregate(pb.AggregateRequest(targets=targets, **kwargs), timeout=30))


# Finding #1: a substituted value is counted against its field's cap as it is placed ------------


@pytest.mark.parametrize("where", ["path", "json-body"])
async def test_a_large_value_repeated_in_a_template_is_refused_before_it_is_built(
    start_server: Any, big: str, where: str
) -> None:
    _, stub = await start_server(large={"kind": "http", "url": big})
    dependency = http("d", "/big", upstream="large")
    if where == "path":
        dependent = http("x", "/x/" + "{{d.s}}" * 256, upstream="large", depends_on=["d"])
    else:  # each whole reference keeps the 1 MB string: 256 of them are 256 MB of JSON
        dependent = http(
            "x", "/x", upstream="large", method="POST", depends_on=["d"],
            json=_value({"all": ["{{d.s}}"] * 256}),
        )  # fmt: skip
    async with LoopWatch() as watch:
        results, code, _, _ = await _run(stub, dependency, dependent)
    assert code == grpc.StatusCode.OK
    failed = {result.id: result for result in results}["x"]
    assert failed.outcome == pb.OUTCOME_ERROR
    cap = "server.max_path_bytes" if where == "path" else "upstreams.large.max_request_bytes"
    assert cap in failed.error
    assert "aaaa" not in failed.error
    assert watch.worst_lag < MAX_STALL, f"the loop stalled {watch.worst_lag * 1000:.0f} ms"
    assert watch.grown_mb < 100, f"RSS grew {watch.grown_mb:.0f} MB"


# Finding #3: the number of targets and the size of JSON payloads, before anything is read ------


async def test_too_many_targets_are_refused_before_any_is_planned(start_server: Any) -> None:
    _, stub = await start_server(server={"max_targets": 100})
    # Every target is also wrong: none is looked at, the count alone answers.
    targets = [pb.Target(id=f"t{i}", http=pb.HttpCall(upstream="nope")) for i in range(20_000)]
    async with LoopWatch() as watch:
        _, code, details, _ = await _run(stub, *targets)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "targets: 20000 targets exceed server.max_targets (100)"
    assert watch.worst_lag < MAX_STALL, f"the loop stalled {watch.worst_lag * 1000:.0f} ms"


async def test_a_large_json_payload_does_not_stall_the_loop(start_server: Any, big: str) -> None:
    _, stub = await start_server(large={"kind": "http", "url": big})
    empties = _value([{}] * 100_000)
    assert empties.ByteSize() >= 400_000
    target = http("x", "/x", upstream="large", method="POST", json=empties)
    async with LoopWatch() as watch:
        results, code, _, _ = await _run(stub, target)
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_OK
    assert watch.worst_lag < MAX_STALL_BESIDE_THREAD, (
        f"the loop stalled {watch.worst_lag * 1000:.0f} ms"
    )


async def test_a_json_payload_over_the_upstreams_cap_is_refused_unread(
    start_server: Any, big: str
) -> None:
    _, stub = await start_server(large={"kind": "http", "url": big, "max_request_bytes": 1000})
    target = http("x", "/x", upstream="large", method="POST", json=_value({"s": "v" * 2000}))
    _, code, details, _ = await _run(stub, target)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "target 'x': http.json: 2015 bytes exceed upstreams.large.max_request_bytes (1000)" in (
        details
    )


# Issue 20: problems are values, rendered as a BadRequest too; #7: they hold no caller values ---


async def test_each_problem_is_a_field_violation_in_the_status_details(stub: Any) -> None:
    targets = [
        http("secret", "/a/../SEKRET-TOKEN-123"),
        pb.Target(id="rpc", grpc=pb.GrpcCall(upstream="rpc", method="SEKRET")),
    ]
    call = stub.Aggregate(pb.AggregateRequest(targets=targets), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in call:
            pass
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SEKRET" not in error.details()
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == error.details()
    bad_request = error_details_pb2.BadRequest()
    assert [packed for packed in status.details if packed.Unpack(bad_request)]
    violations = [(v.field, v.description) for v in bad_request.field_violations]
    assert violations == [
        (
            "targets[secret].http.path",
            "contains . or .. segments (percent-encoded, with ;params or folded included)",
        ),
        ("targets[rpc].grpc.method", "is not a full method name /package.Service/Method"),
    ]


async def test_the_admin_record_keeps_a_named_aggregates_path_as_configured(
    start_server: Any,
) -> None:
    from tests.e2e.test_named_aggregates import PAGE, named

    aggregator, stub = await start_server(
        server={"admin_address": "127.0.0.1:0"}, aggregates={"page": PAGE}
    )
    _, code, _, _ = await collect(
        stub.Aggregate(named("page", sku="alice@example.com"), timeout=10)
    )
    assert code == grpc.StatusCode.OK
    recent = aggregator.recent
    for _ in range(1000):  # recorded right after the call, on this loop
        if recent.records:
            break
        await asyncio.sleep(0)
    paths = {target.id: target.path for target in recent.records[-1].targets}
    assert paths["product"] == "/echo/products/{{params.sku}}"
    assert not any("alice" in path for path in paths.values())
