"""Issue 23, the admin page's findings, against a real aggregator on loopback: #6 (the page
answers only its own name: DNS rebinding gets 421), #12 (a non-loopback admin address is
refused at load unless server.admin_allow_remote), #9 (a kept target's record is bounded
whatever its method name)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from aggregator.config import ConfigError, config_from_mapping
from aggregator.lifecycle import AggregatorServer
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http, rpc_target
from tests.e2e.test_admin import recorded

ADMIN = {"admin_address": "127.0.0.1:0"}
# Every kind of route: the page, its files, the JSON API, a detail and a path that is none.
ROUTES = (
    "/", "/static/admin.css", "/static/overview.js", "/aggregates/host-check",
    "/api/upstreams", "/api/aggregates", "/api/aggregates/host-check", "/nothing-here",
)  # fmt: skip


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


async def _admin_with_one_aggregate(start_server: Any, **server: Any) -> AggregatorServer:
    aggregator, stub = await start_server(server={**ADMIN, **server})
    request = pb.AggregateRequest(targets=[http("secret_named_target", "/delay/1")])
    await collect(stub.Aggregate(request, metadata=(("x-request-id", "host-check"),)))
    await recorded(aggregator, "host-check")
    return aggregator


async def _detail(
    session: aiohttp.ClientSession, aggregator: AggregatorServer, request_id: str
) -> bytes:
    """/api/aggregates/<request_id> as the page reads it, once the call is recorded."""
    await recorded(aggregator, request_id)
    url = f"http://127.0.0.1:{aggregator.admin_port}/api/aggregates/{request_id}"
    async with session.get(url) as response:
        assert response.status == 200
        return await response.read()


async def _status(
    session: aiohttp.ClientSession, port: int, path: str, host: str
) -> tuple[int, str, Any]:
    url = f"http://127.0.0.1:{port}{path}"
    async with session.get(url, headers={"Host": host}) as response:
        return response.status, await response.text(), response.headers


async def test_a_rebound_name_gets_421_on_every_admin_route(start_server, session):
    """#6: a page at attacker.example that made its name resolve to 127.0.0.1 reads nothing."""
    aggregator = await _admin_with_one_aggregate(start_server)
    port = aggregator.admin_port
    rebound = (
        "attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io",
        "localhost.attacker.example", "[::2]", "10.0.0.1", "127.0.0.1:x", "[::1",
    )  # fmt: skip
    for host in rebound:
        for path in ROUTES:
            status, text, headers = await _status(session, port, path, host)
            assert status == 421, (host, path)
            assert list(json.loads(text)) == ["error"]
            assert "secret_named_target" not in text
            assert headers["Cache-Control"] == "no-store"


async def test_loopback_names_and_the_admin_address_are_answered(start_server, session):
    aggregator = await _admin_with_one_aggregate(start_server)
    port = aggregator.admin_port
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST.",
                 f"[::1]:{port}", "[::1]", f"admin.localhost:{port}", "127.0.0.2"):  # fmt: skip
        status, text, _ = await _status(session, port, "/api/aggregates/host-check", host)
        assert status == 200, host
        assert "secret_named_target" in text


async def test_server_admin_hosts_names_more_hosts(start_server, session):
    aggregator = await _admin_with_one_aggregate(
        start_server, admin_hosts=["Admin.Example.Internal"]
    )
    port = aggregator.admin_port
    status, _, _ = await _status(session, port, "/api/upstreams", f"admin.example.internal:{port}")
    assert status == 200
    status, _, _ = await _status(session, port, "/api/upstreams", "other.example.internal")
    assert status == 421


async def test_a_request_without_host_gets_421(start_server):
    aggregator = await _admin_with_one_aggregate(start_server)
    reader, writer = await asyncio.open_connection("127.0.0.1", aggregator.admin_port)
    try:
        writer.write(b"GET /api/aggregates HTTP/1.0\r\n\r\n")
        answer = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.0 421") or answer.startswith(b"HTTP/1.1 421")
    assert b"secret_named_target" not in answer


@pytest.mark.parametrize("address", ["0.0.0.0:9465", "[::]:9465", "10.1.2.3:9465", "admin:9465"])
def test_a_non_loopback_admin_address_is_refused_naming_the_key(address):
    """#12: the page has no authentication, so serving it beyond this host must be meant."""
    with pytest.raises(ConfigError, match=r"server\.admin_address.*server\.admin_allow_remote"):
        config_from_mapping({"server": {"admin_address": address}})
    allowed = {"admin_address": address, "admin_allow_remote": True}
    assert config_from_mapping({"server": allowed}).server.admin_address == address


def test_admin_hosts_and_allow_remote_are_checked_by_key():
    server = config_from_mapping({}).server
    assert (server.admin_hosts, server.admin_allow_remote) == ((), False)
    for raw in ({"admin_hosts": "a.example"}, {"admin_hosts": ["a.example:80"]},
                {"admin_hosts": ["http://a"]}, {"admin_allow_remote": "yes"}):  # fmt: skip
        key = next(iter(raw))
        with pytest.raises(ConfigError, match=rf"server\.{key}"):
            config_from_mapping({"server": raw})


async def test_a_wildcard_admin_address_answers_the_address_it_was_reached_at(
    start_server, session
):
    aggregator = await _admin_with_one_aggregate(
        start_server, admin_address="0.0.0.0:0", admin_allow_remote=True
    )
    port = aggregator.admin_port
    status, _, _ = await _status(session, port, "/api/upstreams", f"127.0.0.1:{port}")
    assert status == 200
    status, _, _ = await _status(session, port, "/api/upstreams", "attacker.example")
    assert status == 421


async def test_a_target_with_an_8_kib_method_name_is_kept_bounded(start_server, session):
    """#9: the record kept the method whole (~9.3 KB a target, ~465 MB at the ring's cap)."""
    aggregator, stub = await start_server(server=ADMIN)
    method = "M" * (8 * 1024 - len("/test.Upstream/"))
    targets = [rpc_target(f"long_{n}", method, b"x") for n in range(10)]
    request = pb.AggregateRequest(targets=targets)
    results, _, _, _ = await collect(
        stub.Aggregate(request, metadata=(("x-request-id", "long-method"),))
    )
    assert len(results) == 10
    body = await _detail(session, aggregator, "long-method")
    detail = json.loads(body)
    assert sorted(t["id"] for t in detail["targets"]) == [f"long_{n}" for n in range(10)]
    assert all(t["method"].startswith("/test.Upstream/MMM") for t in detail["targets"])
    assert len(body) < 10 * 1024, len(body)  # ~800 bytes a target; was 8+ KiB each


async def test_a_named_aggregates_path_is_kept_as_configured_not_with_its_params(
    start_server, session
):
    """#7, the record's part: a parameter's value (an e-mail address) never reaches the admin
    record through a bound path; the record keeps the path as configured."""
    user = {"params": {"user": {"required": True}}, "targets": [
        {"id": "profile", "http": {"upstream": "rest", "path": "/echo/users/{{params.user}}"}},
    ]}  # fmt: skip
    aggregator, stub = await start_server(server=ADMIN, aggregates={"user": user})
    request = pb.AggregateRequest(aggregate="user")
    request.params.update({"user": "alice@example.com"})
    results, code, _, _ = await collect(
        stub.Aggregate(request, metadata=(("x-request-id", "named-path"),))
    )
    assert (code, [r.outcome for r in results]) == (grpc.StatusCode.OK, [pb.OUTCOME_OK])
    text = (await _detail(session, aggregator, "named-path")).decode()
    assert json.loads(text)["targets"][0]["path"] == "/echo/users/{{params.user}}"
    assert "alice" not in text


async def test_an_unknown_aggregate_name_is_not_repeated_in_the_status_or_the_log(
    start_server, session, caplog
):
    """#7, the server's own sentence: the name a caller sent is a value like any other."""
    aggregator, stub = await start_server(server=ADMIN)
    request = pb.AggregateRequest(aggregate="SEKRET-TOKEN-123")
    with caplog.at_level(logging.INFO, logger="aggregator"):
        _, code, details, _ = await collect(
            stub.Aggregate(request, metadata=(("x-request-id", "unknown-name"),))
        )
        text = (await _detail(session, aggregator, "unknown-name")).decode()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "aggregate: not a configured aggregate" in details
    logged = [r for r in caplog.records if getattr(r, "request_id", "") == "unknown-name"]
    assert len(logged) == 1
    assert logged[0].error.startswith("aggregate: not a configured aggregate")
    for seen in (details, text, caplog.text):
        assert "SEKRET" not in seen
