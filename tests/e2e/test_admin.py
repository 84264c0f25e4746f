"""The admin page's JSON (docs/admin.md) against a real server and real upstreams: what is kept,
the filters, 404 and 400 answers, the privacy rule, and the memory a kept aggregate costs."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from google.protobuf import struct_pb2

from aggregator.admin.recent import Recent
from aggregator.admin.rolling import RollingStats
from aggregator.call_record import CallRecord
from aggregator.config import ConfigError, config_from_mapping
from aggregator.fanout import Budget
from aggregator.lifecycle import AggregatorServer
from aggregator.plan import make_plan
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http, rpc_target, wait_for

ADMIN = {"admin_address": "127.0.0.1:0"}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


async def call(stub: Any, request_id: str, *targets: pb.Target, deadline: float = 5.0) -> Any:
    request = pb.AggregateRequest(targets=targets)
    return await collect(
        stub.Aggregate(request, metadata=(("x-request-id", request_id),), timeout=deadline)
    )


async def recorded(server: AggregatorServer, request_id: str) -> None:
    """Until the aggregate is recorded: that runs right after the call, on this loop."""
    assert server.recent is not None
    for _ in range(1000):
        if server.recent.find(request_id) is not None:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{request_id} was never recorded")


async def get(
    session: aiohttp.ClientSession, server: AggregatorServer, path: str
) -> tuple[int, str, Any]:
    async with session.get(f"http://127.0.0.1:{server.admin_port}{path}") as response:
        text = await response.text()
        kind = response.headers.get("Content-Type", "")
        body = json.loads(text) if kind.startswith("application/json") else None
        assert "Traceback" not in text
        return response.status, text, body


async def test_the_api_shows_upstreams_and_recent_aggregates(start_server, session):
    server, stub = await start_server(server=ADMIN)
    await call(stub, "admin-ok", http("fast", "/delay/5"), rpc_target("echo", "Echo", b"x"))
    await call(
        stub, "admin-bad",
        http("slow", "/delay/60"), http("broken", "/status/503"), http("gone", "/x", "dead"),
        rpc_target("failing", "Fail", b"14"),
    )  # fmt: skip
    await recorded(server, "admin-bad")

    status, _, listed = await get(session, server, "/api/aggregates")
    assert status == 200
    assert [a["request_id"] for a in listed["aggregates"]] == ["admin-bad", "admin-ok"]
    bad = listed["aggregates"][0]
    assert bad["aggregate"] == "ad_hoc"
    assert bad["status"] == "OK"  # no target was required
    assert (bad["targets"], bad["failed"]) == (4, 3)
    assert sorted(bad["failed_ids"]) == ["broken", "failing", "gone"]
    assert bad["elapsed_ms"] >= 60
    assert listed["keep"] == 500

    status, _, detail = await get(session, server, "/api/aggregates/admin-bad")
    assert status == 200
    targets = {t["id"]: t for t in detail["targets"]}
    assert targets["slow"] == {
        **targets["slow"], "upstream": "rest", "method": "GET", "path": "/delay/60",
        "outcome": "ok", "status": 200, "attempts": 1, "cache": "unspecified",
        "from_fallback": False, "error": "",
    }  # fmt: skip
    assert targets["slow"]["latency_ms"] >= 60
    assert targets["broken"]["outcome"] == "error"
    assert targets["broken"]["status"] == 503
    assert targets["gone"]["outcome"] == "unavailable"
    assert targets["gone"]["status"] is None
    assert targets["gone"]["error"]
    failing = targets["failing"]
    assert (failing["upstream"], failing["method"], failing["path"]) == (
        "rpc", "/test.Upstream/Fail", ""
    )  # fmt: skip
    assert failing["status"] == "UNAVAILABLE"
    assert detail["deadline_ms"] == pytest.approx(5000, rel=0.05)
    # When the server stopped waiting: 5 s less a margin of 5% (docs/api.md, "Deadlines").
    assert detail["cutoff_ms"] == pytest.approx(detail["deadline_ms"] * 0.95)

    status, _, only_failed = await get(session, server, "/api/aggregates?failed=true")
    assert [a["request_id"] for a in only_failed["aggregates"]] == ["admin-bad"]
    status, _, slowest = await get(session, server, "/api/aggregates?slowest=1")
    assert [a["request_id"] for a in slowest["aggregates"]] == ["admin-bad"]
    status, _, limited = await get(session, server, "/api/aggregates?limit=1&failed=false")
    assert [a["request_id"] for a in limited["aggregates"]] == ["admin-bad"]

    status, _, upstreams = await get(session, server, "/api/upstreams")
    rows = {row["name"]: row for row in upstreams["upstreams"]}
    assert set(rows) == {"rest", "rpc", "dead"}
    rest = rows["rest"]
    assert rest == {
        **rest, "kind": "http", "endpoints": {"active": 1, "ejected": 0}, "breaker": "none",
        "in_flight": 0, "targets": 3, "error_rate": pytest.approx(1 / 3, abs=0.001),
        "cache_hit_ratio": None,
    }  # fmt: skip
    assert rest["concurrency_limit"] > 0
    assert 40 <= rest["p99_ms"] <= 100  # the 60 ms target, within a bin's 15%
    assert rest["p50_ms"] <= rest["p99_ms"]
    assert rows["rpc"]["kind"] == "grpc"
    assert rows["rpc"]["targets"] == 2
    assert rows["dead"]["error_rate"] == 1.0


async def test_a_cancelled_call_and_a_refused_call_are_kept_too(start_server, session, rest):
    server, stub = await start_server(server=ADMIN)
    pending = stub.Aggregate(
        pb.AggregateRequest(targets=[http("done", "/delay/1"), http("hung", "/hang")]),
        metadata=(("x-request-id", "admin-cut"),),
    )
    await anext(aiter(pending))  # "done" reported
    await wait_for(rest.recorder.hanging)
    pending.cancel()
    await wait_for(rest.recorder.cancelled)
    _, code, _, _ = await call(stub, "admin-invalid", http("bad id!", "/delay/1"))
    assert code.name == "INVALID_ARGUMENT"
    await recorded(server, "admin-invalid")
    await recorded(server, "admin-cut")
    _, _, cut = await get(session, server, "/api/aggregates/admin-cut")
    assert cut["status"] == "CANCELLED"
    outcomes = {t["id"]: t["outcome"] for t in cut["targets"]}
    assert outcomes == {"done": "ok", "hung": "cancelled"}
    _, _, invalid = await get(session, server, "/api/aggregates/admin-invalid")
    assert (invalid["status"], invalid["targets"], invalid["requested"]) == (
        "INVALID_ARGUMENT", [], 1
    )  # fmt: skip


async def test_unknown_ids_and_paths_are_404_and_odd_queries_400(start_server, session):
    server, stub = await start_server(server=ADMIN)
    await call(stub, "admin-known", http("a", "/delay/1"))
    await recorded(server, "admin-known")
    for path in (
        "/api/aggregates/never-seen", "/aggregates/never-seen", "/nope", "/api",
        "/api/aggregates/admin-known/more", "/static/", "/static/../server.py",
        "/static/%2e%2e/recent.py", "/aggregates/" + "x" * 200, "/api/aggregates/bad%20id",
        "/static/overview.html",
    ):  # fmt: skip
        status, _, body = await get(session, server, path)
        assert status == 404, path
        assert body is not None, path
        assert body["error"], path
    for query in (
        "?nope=1", "?slowest=abc", "?slowest=0", "?slowest=-1", "?slowest=501", "?failed=yes",
        "?failed=true&failed=true", "?failed=%ff", "?" + "a" * 300, "?slowest", "?=1",
        "?slowest=99999999999999999999", "?limit=1e3",
    ):  # fmt: skip
        status, _, body = await get(session, server, "/api/aggregates" + query)
        assert status == 400, query
        assert body is not None, query
        assert body["error"], query
    for path in ("/?x=1", "/api/upstreams?failed=true", "/api/aggregates/admin-known?x"):
        status, _, _ = await get(session, server, path)
        assert status == 400, path
    url = f"http://127.0.0.1:{server.admin_port}/api/aggregates"
    async with session.post(url, data=b"x") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"
        assert "Traceback" not in await response.text()
    status, _, _ = await get(session, server, "/aggregates/admin-known")
    assert status == 200


async def test_pages_are_served_from_the_package_with_a_strict_policy(start_server, session):
    server, stub = await start_server(server=ADMIN)
    await call(stub, "admin-page", http("a", "/delay/1"))
    await recorded(server, "admin-page")
    for path, kind in (
        ("/", "text/html"), ("/aggregates/admin-page", "text/html"),
        ("/static/admin.css", "text/css"), ("/static/overview.js", "text/javascript"),
        ("/static/waterfall.js", "text/javascript"), ("/api/upstreams", "application/json"),
    ):  # fmt: skip
        url = f"http://127.0.0.1:{server.admin_port}{path}"
        async with session.get(url) as response:
            assert response.status == 200, path
            assert response.content_type == kind
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            text = await response.text()
            # Nothing from another host: no absolute URL to fetch anything from.
            assert "http://" not in text
            assert "https://" not in text
            assert "//cdn" not in text


async def test_no_secret_sent_in_a_call_reaches_the_admin_page(start_server, session):
    secrets = {
        "header": "hdr-SECRET-7f3a", "query": "qry-SECRET-91bc", "body": "body-SECRET-c0de",
        "json": "json-SECRET-5e11", "metadata": "meta-SECRET-2b2b", "token": "tok-SECRET-d00d",
        "name": "qname-SECRET-4444", "request": "req-SECRET-abab",
    }  # fmt: skip
    server, stub = await start_server(server=ADMIN)
    json_body = struct_pb2.Value()
    json_body.struct_value.update({"secret": secrets["json"]})
    await call(
        stub, "admin-private",
        http("echoed", "/echo/x", method="POST", headers={"x-secret": secrets["header"]},
             query={secrets["name"]: secrets["query"]}, body=secrets["body"].encode()),
        http("json", "/echo/y", method="POST", json=json_body,
             headers={"authorization": f"Bearer {secrets['token']}"}),
        http("failing", "/status/500", query={"q": secrets["query"]},
             headers={"x-secret": secrets["header"]}),
        rpc_target("rpc", "Echo", secrets["request"].encode(),
                   metadata={"x-secret": secrets["metadata"]}),
        rpc_target("rpc-fail", "Fail", b"13", metadata={"x-secret": secrets["metadata"]}),
        http("gone", "/x", "dead", query={"q": secrets["query"]}),
    )  # fmt: skip
    await recorded(server, "admin-private")
    pages = (
        "/", "/aggregates/admin-private", "/api/upstreams", "/api/aggregates",
        "/api/aggregates?failed=true", "/api/aggregates?slowest=5",
        "/api/aggregates/admin-private", "/static/overview.js", "/static/waterfall.js",
    )  # fmt: skip
    seen = ""
    for path in pages:
        status, text, _ = await get(session, server, path)
        assert status == 200, path
        seen += text
    _, _, detail = await get(session, server, "/api/aggregates/admin-private")
    assert {t["id"] for t in detail["targets"]} >= {"echoed", "json", "failing", "rpc", "gone"}
    for where, secret in secrets.items():
        assert secret not in seen, f"the {where} secret reached the admin page"
        assert secret.split("-")[0] + "-SECRET" not in seen


async def test_the_ring_keeps_only_the_last_admin_recent(start_server, session):
    server, stub = await start_server(server={**ADMIN, "admin_recent": 3})
    for n in range(5):
        await call(stub, f"ring-{n}", http("a", "/delay/1"))
    await recorded(server, "ring-4")
    _, _, listed = await get(session, server, "/api/aggregates")
    assert [a["request_id"] for a in listed["aggregates"]] == ["ring-4", "ring-3", "ring-2"]
    assert (listed["kept"], listed["keep"]) == (3, 3)
    status, _, _ = await get(session, server, "/api/aggregates/ring-0")
    assert status == 404
    status, _, _ = await get(session, server, "/api/aggregates?slowest=4")
    assert status == 400  # more than are kept


async def test_an_empty_admin_address_serves_nothing_and_keeps_nothing(start_server):
    server, stub = await start_server(server={"admin_address": ""})
    assert server.recent is None
    assert server.admin_port == 0
    _, code, _, _ = await call(stub, "no-admin", http("a", "/delay/1"))
    assert code.name == "OK"


async def test_a_taken_admin_port_is_an_error_naming_the_key(start_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"server\.admin_address 127\.0\.0\.1:{port}"):
            await start_server(server={"admin_address": f"127.0.0.1:{port}"})


def test_admin_config_defaults_and_key_path_errors():
    server = config_from_mapping({}).server
    assert (server.admin_address, server.admin_recent) == ("127.0.0.1:9465", 500)
    assert config_from_mapping({"server": {"admin_address": ""}}).server.admin_address == ""
    for raw, key in (
        ({"admin_address": "9465"}, "server.admin_address"),
        ({"admin_address": 9465}, "server.admin_address"),
        ({"admin_recent": 0}, "server.admin_recent"),
        ({"admin_recent": "many"}, "server.admin_recent"),
        ({"admin_recent": 10_000_000}, "server.admin_recent"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_mapping({"server": raw})


def test_wide_aggregates_are_kept_fewer_so_memory_stays_bounded():
    recent = Recent(500, ["rest"], max_targets=25)
    for n in range(4):
        recent.record(_call(f"wide-{n}", 10, _results(10)))
    assert [r.request_id for r in recent.newest()] == ["wide-3", "wide-2"]
    recent.record(_call("wider", 40, _results(40)))
    assert [r.request_id for r in recent.newest()] == ["wider"]  # the newest always stays


def test_rolling_stats_forget_what_is_older_than_a_minute():
    stats = RollingStats()
    for n in range(100):
        stats.add(1000, (n + 1) * 1_000_000, failed=n >= 90, cache=2 if n < 25 else 1)
    summary = stats.summary(1000)
    assert summary["targets"] == 100
    assert 50 * 0.85 <= summary["p50_ms"] <= 50 * 1.15
    assert 99 * 0.85 <= summary["p99_ms"] <= 99 * 1.15
    assert summary["error_rate"] == 0.1
    assert summary["cache_hit_ratio"] == 0.25
    stats.add(1030, 5_000_000, failed=False, cache=0)
    assert stats.summary(1059)["targets"] == 101
    later = stats.summary(1060)  # the second 1000 is a minute old: dropped
    assert (later["targets"], later["error_rate"], later["cache_hit_ratio"]) == (1, 0.0, None)
    stats.add(1060, 1_000_000, failed=True, cache=0)  # the slot second 1000 used, reused
    assert stats.summary(1060)["targets"] == 1  # made once a second: pages poll at will
    assert stats.summary(1061)["targets"] == 2


def _call(
    request_id: str, requested: int, results: list[pb.TargetResult], **fields: Any
) -> CallRecord:
    """A call that ended OK with ``results``, as the server hands it to the admin record."""
    budget = Budget(seconds=5.0, started=0.0, stop_at=4.75)
    call = CallRecord(request_id, "ad_hoc", requested, budget, elapsed_ns=1, **fields)
    call.reported = results
    return call


def _results(count: int) -> list[pb.TargetResult]:
    results = []
    for n in range(count):
        result = pb.TargetResult(
            id=f"target-{n}", outcome=pb.OUTCOME_OK, http_status=200, attempts=1,
            body=b"x" * 4096,  # never kept
        )  # fmt: skip
        result.start_offset.FromNanoseconds(1_000_000 + n)
        result.latency.FromNanoseconds(25_000_000 + n * 1000)
        results.append(result)
    return results


def test_a_kept_aggregate_costs_bounded_memory(capsys):
    """Bytes per kept aggregate of 10 targets (reported in docs/admin.md), in a full ring."""
    config = config_from_mapping({"upstreams": {"rest": {"kind": "http", "url": "http://h"}}})
    request = pb.AggregateRequest(
        targets=[http(f"target-{n}", f"/items/{n}", query={"q": "v"}) for n in range(10)]
    )
    results = _results(10)
    keep = 500
    recent = Recent(keep, ["rest"])
    gc.collect()
    tracemalloc.start()
    try:
        for _round in range(2):  # fill the ring, then replace every aggregate in it
            for n in range(keep):
                call = _call(f"req-{n:06d}-0123456789abcdef", 10, results)
                call.plan, call.elapsed_ns = make_plan(request, config), 30_000_000 + n
                recent.record(call)
            gc.collect()
            if _round == 0:
                full = tracemalloc.get_traced_memory()[0]
        refilled = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_aggregate = full / keep
    with capsys.disabled():
        print(f"\nadmin: {per_aggregate:.0f} bytes per kept aggregate of 10 targets "
              f"({full} bytes for {keep}; {refilled} after replacing them all)")  # fmt: skip
    assert len(recent.records) == keep
    assert per_aggregate < 5000  # about 3.4 KiB measured; never the 40 KiB of bodies
    assert refilled < full * 1.05 + 64 * 1024  # replacing them all does not grow it


async def test_a_caller_reusing_a_request_id_cannot_take_over_the_link_to_another_aggregate(
    start_server, session
):
    # Request ids come from callers: the overview links by request id and seq, so the victim's
    # row still opens the victim's aggregate after an attacker sent the same id.
    server, stub = await start_server(server=ADMIN)
    await call(stub, "shared-id", http("victim_target", "/status/503"))
    await recorded(server, "shared-id")
    _, _, listed = await get(session, server, "/api/aggregates")
    victim_seq = listed["aggregates"][0]["seq"]
    await call(stub, "shared-id", http("attacker_target", "/delay/1"))
    for _ in range(1000):  # recorded right after the call, on this loop
        if len(server.recent.records) == 2:
            break
        await asyncio.sleep(0)
    assert server.recent.find("shared-id").targets[0].id == "attacker_target"
    status, _, detail = await get(session, server, f"/api/aggregates/shared-id?seq={victim_seq}")
    assert status == 200
    assert [t["id"] for t in detail["targets"]] == ["victim_target"]
    status, _, _ = await get(session, server, f"/aggregates/shared-id?seq={victim_seq}")
    assert status == 200
    status, _, _ = await get(session, server, "/api/aggregates/shared-id?seq=999999")
    assert status == 404
    status, _, _ = await get(session, server, "/api/aggregates/shared-id?seq=x")
    assert status == 400
