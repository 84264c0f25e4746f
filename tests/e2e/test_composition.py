"""Composition against real upstreams: substitution, for_each, the response cache (memory and
a real Redis), coalescing, and Collect's merged view."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from aggregator.v1 import aggregator_pb2 as pb
from tests.clocks import ManualClock
from tests.conftest import collect, http, ids, wait_for
from tests.upstreams import free_port, refused_port


async def aggregate(stub, *targets: pb.Target, timeout: float = 5):
    return await collect(
        stub.Aggregate(pb.AggregateRequest(targets=list(targets)), timeout=timeout)
    )


def source(target_id: str, body: Any, **fields: Any) -> pb.Target:
    """A target whose upstream answers ``body`` as JSON."""
    return http(target_id, "/json", query={"body": json.dumps(body)}, **fields)


def json_value(value: Any) -> Any:
    message = pb.HttpCall().json
    json_format.ParseDict(value, message)
    return message


async def test_values_are_substituted_into_path_query_headers_and_json(stub):
    user = source("user", {"id": 42, "name": "a/b c", "tags": ["x", "y"]})
    orders = http(
        "orders",
        "/echo/users/{{user.id}}/{{user.name}}",
        method="POST",
        query={"tag": "{{user.tags.1}}"},
        headers={"X-User": "user-{{user.id}}"},
        json=json_value({"uid": "{{user.id}}", "label": "id-{{user.id}}", "tags": "{{user.tags}}"}),
        depends_on=["user"],
    )
    results, code, _, _ = await aggregate(stub, user, orders)
    assert code == grpc.StatusCode.OK
    seen = json.loads(next(r for r in results if r.id == "orders").body)
    # The value's "/" is encoded: it cannot add a path segment.
    assert seen["path"] == "/echo/users/42/a%2Fb%20c?tag=y"
    assert seen["headers"]["X-User"] == "user-42"
    assert json.loads(seen["body"]) == {"uid": 42, "label": "id-42", "tags": ["x", "y"]}


async def test_a_reference_that_does_not_resolve_is_an_error(stub, rest):
    user = source("user", {"id": 42})
    orders = http("orders", "/echo/{{user.missing}}", depends_on=["user"])
    results, code, _, _ = await aggregate(stub, user, orders)
    by_id = {r.id: r for r in results}
    assert code == grpc.StatusCode.OK
    assert by_id["orders"].outcome == pb.OUTCOME_ERROR
    assert "{{user.missing}} does not resolve" in by_id["orders"].error
    assert len(rest.recorder.requests) == 1  # only the user call went out


@pytest.mark.parametrize("value", ["..", "."])
async def test_dot_segments_cannot_be_substituted_into_a_path(stub, rest, value):
    user = source("user", {"id": value})
    orders = http("orders", "/echo/{{user.id}}/admin", depends_on=["user"])
    results, _, _, _ = await aggregate(stub, user, orders)
    assert next(r for r in results if r.id == "orders").outcome == pb.OUTCOME_ERROR
    assert len(rest.recorder.requests) == 1


async def test_a_dependency_without_json_is_an_error_for_its_dependents(stub):
    text = http("text", "/text")
    user = http("user", "/echo/{{text.id}}", depends_on=["text"])
    results, _, _, _ = await aggregate(stub, text, user)
    error = next(r for r in results if r.id == "user").error
    assert "dependency 'text' did not answer with JSON" in error


async def test_a_reference_to_a_non_dependency_is_invalid(stub, rest):
    user = source("user", {"id": 1})
    orders = http("orders", "/echo/{{user.id}}")
    _, code, details, _ = await aggregate(stub, user, orders)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "target 'orders': {{user.id}} names no target in depends_on" in details
    assert rest.recorder.requests == []


async def test_a_fallback_value_feeds_dependents(stub):
    user = http("user", "/status/503")
    user.fallback.CopyFrom(json_value({"id": 7}))
    orders = http("orders", "/echo/{{user.id}}", depends_on=["user"])
    results, _, _, _ = await aggregate(stub, user, orders)
    assert json.loads(next(r for r in results if r.id == "orders").body)["path"] == "/echo/7"


async def test_for_each_makes_one_call_per_element(stub, rest):
    listing = source("list", {"items": [{"sku": "A"}, {"sku": "B"}, {"sku": "C"}]})
    detail = http(
        "detail", "/echo/sku/{{item.sku}}", depends_on=["list"], for_each="{{list.items}}"
    )
    results, code, _, trailers = await aggregate(stub, listing, detail)
    assert code == grpc.StatusCode.OK
    assert sorted(ids(results)) == ["detail[0]", "detail[1]", "detail[2]", "list"]
    paths = {r.id: json.loads(r.body)["path"] for r in results if r.id.startswith("detail")}
    assert paths == {
        "detail[0]": "/echo/sku/A",
        "detail[1]": "/echo/sku/B",
        "detail[2]": "/echo/sku/C",
    }
    assert trailers["x-aggregate-succeeded"] == "4"


async def test_for_each_element_failures_are_listed_by_element_id(stub):
    listing = source("list", {"codes": [200, 503]})
    detail = http("d", "/status/{{item}}", depends_on=["list"], for_each="{{list.codes}}")
    results, _, _, trailers = await aggregate(stub, listing, detail)
    assert {r.id: r.outcome for r in results if r.id != "list"} == {
        "d[0]": pb.OUTCOME_OK,
        "d[1]": pb.OUTCOME_ERROR,
    }
    assert trailers["x-aggregate-failed"] == "d[1]"


async def test_targets_depending_on_a_for_each_wait_for_every_element(stub):
    listing = source("list", {"items": [30, 60]})
    detail = http("d", "/delay/{{item}}", depends_on=["list"], for_each="{{list.items}}")
    after = http("after", "/delay/1", depends_on=["d"])
    results, _, _, _ = await aggregate(stub, listing, detail, after)
    assert ids(results)[-1] == "after"


async def test_for_each_over_an_empty_array_reports_nothing_for_it(stub):
    listing = source("list", {"items": []})
    detail = http("d", "/echo/{{item}}", depends_on=["list"], for_each="{{list.items}}")
    results, code, _, trailers = await aggregate(stub, listing, detail, timeout=5)
    assert code == grpc.StatusCode.OK
    assert ids(results) == ["list"]
    assert float(trailers["x-aggregate-elapsed-ms"]) < 1000  # not waiting for the deadline


async def test_for_each_is_bounded_by_max_targets(start_server, rest):
    _, stub = await start_server(server={"max_targets": 5})
    listing = source("list", {"items": list(range(10))})
    detail = http("d", "/echo/{{item}}", depends_on=["list"], for_each="{{list.items}}")
    results, _, _, _ = await aggregate(stub, listing, detail)
    failed = next(r for r in results if r.id == "d")
    assert failed.outcome == pb.OUTCOME_ERROR
    assert "over server.max_targets (5)" in failed.error
    assert len(rest.recorder.requests) == 1


async def test_for_each_over_a_non_array_is_an_error(stub):
    listing = source("list", {"items": {"a": 1}})
    detail = http("d", "/echo/{{item}}", depends_on=["list"], for_each="{{list.items}}")
    results, _, _, _ = await aggregate(stub, listing, detail)
    assert "is not an array" in next(r for r in results if r.id == "d").error


async def test_for_each_with_a_failed_dependency_is_one_skipped_result(stub):
    listing = http("list", "/status/500")
    detail = http("d", "/echo/{{item}}", depends_on=["list"], for_each="{{list.items}}")
    results, _, _, _ = await aggregate(stub, listing, detail)
    assert {r.id: r.outcome for r in results} == {
        "list": pb.OUTCOME_ERROR,
        "d": pb.OUTCOME_SKIPPED,
    }


CACHED = {"ttl": "30s"}


def cached_upstream(rest, **cache: Any) -> dict[str, Any]:
    return {"kind": "http", "url": rest.url, "cache": {**CACHED, **cache}}


async def test_second_identical_get_is_a_cache_hit(start_server, rest):
    server, stub = await start_server(cached=cached_upstream(rest))
    first, _, _, _ = await aggregate(stub, http("a", "/count/k", upstream="cached"))
    second, _, _, _ = await aggregate(stub, http("a", "/count/k", upstream="cached"))
    assert first[0].cache == pb.CACHE_STATUS_MISS
    assert second[0].cache == pb.CACHE_STATUS_HIT
    assert second[0].attempts == 0
    assert second[0].body == first[0].body
    assert rest.recorder.counts["k"] == 1
    hits = server.metrics.registry.get_sample_value(
        "aggregator_cache_requests_total", {"upstream": "cached", "result": "hit"}
    )
    assert hits == 1


@pytest.mark.parametrize("cache_control", ["no-store", "private", "max-age=0"])
async def test_cache_control_can_forbid_storing(start_server, rest, cache_control):
    _, stub = await start_server(cached=cached_upstream(rest))
    target = http("a", "/count/k", upstream="cached", query={"cc": cache_control})
    await aggregate(stub, target)
    second, _, _, _ = await aggregate(stub, target)
    assert second[0].cache == pb.CACHE_STATUS_MISS
    assert rest.recorder.counts["k"] == 2


async def test_post_and_different_credentials_are_not_shared(start_server, rest):
    _, stub = await start_server(cached=cached_upstream(rest))
    for _ in range(2):
        await aggregate(stub, http("p", "/count/post", upstream="cached", method="POST"))
    for token in ("alice", "bob"):
        target = http("a", "/count/auth", upstream="cached", headers={"Authorization": token})
        results, _, _, _ = await aggregate(stub, target)
        assert results[0].cache == pb.CACHE_STATUS_MISS
    assert rest.recorder.counts == {"post": 2, "auth": 2}


async def test_stale_entry_is_served_when_the_upstream_fails(start_server, rest):
    clock = ManualClock()
    cached = cached_upstream(rest, ttl="100ms", stale_if_error="1m")
    _, stub = await start_server(cached=cached, clock=clock)
    fresh, _, _, _ = await aggregate(stub, http("a", "/toggle/k", upstream="cached"))
    again, _, _, _ = await aggregate(stub, http("a", "/toggle/k", upstream="cached"))
    assert again[0].cache == pb.CACHE_STATUS_HIT
    clock.advance(0.15)  # the cache's clock: the entry goes stale
    rest.recorder.failing = True
    stale, code, _, _ = await aggregate(stub, http("a", "/toggle/k", upstream="cached"))
    assert code == grpc.StatusCode.OK
    assert stale[0].outcome == pb.OUTCOME_OK
    assert stale[0].cache == pb.CACHE_STATUS_STALE
    assert stale[0].body == fresh[0].body
    assert rest.recorder.counts["k"] == 2  # the upstream was asked, and failed


async def test_identical_calls_in_flight_go_upstream_once(start_server, rest):
    _, stub = await start_server(cached=cached_upstream(rest))
    targets = [http(f"t{i}", "/gate/k", upstream="cached") for i in range(5)]
    call = stub.Aggregate(pb.AggregateRequest(targets=targets), timeout=5)
    other = stub.Aggregate(pb.AggregateRequest(targets=targets[:1]), timeout=5)
    await wait_for(rest.recorder.arrived)
    rest.recorder.gate.set()
    results, _, _, _ = await collect(call)
    more, _, _, _ = await collect(other)
    assert all(r.outcome == pb.OUTCOME_OK for r in [*results, *more])
    assert rest.recorder.counts["k"] == 1
    assert sorted(r.attempts for r in [*results, *more]) == [0, 0, 0, 0, 0, 1]


async def joined(coalescer: Any, waiting: int) -> None:
    """Waits (bounded) until ``waiting`` callers wait on shared calls: nothing signals it."""
    for _ in range(1000):
        if coalescer.waiting == waiting:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{coalescer!r}: never {waiting} waiting")


async def test_a_caller_that_cancels_does_not_cancel_the_shared_call(start_server, rest):
    server, stub = await start_server(cached=cached_upstream(rest))
    request = pb.AggregateRequest(targets=[http("a", "/gate/k", upstream="cached")])
    leaving = stub.Aggregate(request, timeout=5)
    await wait_for(rest.recorder.arrived)
    staying = stub.Aggregate(request, timeout=5)
    coalescer = server.endpoints["cached"].coalescer
    await joined(coalescer, 2)  # the second call waits on the shared one
    leaving.cancel()
    await joined(coalescer, 1)
    rest.recorder.gate.set()
    results, code, _, _ = await collect(staying)
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_OK
    assert rest.recorder.counts["k"] == 1
    assert rest.recorder.cancelled.empty()


async def test_collect_merges_json_bodies_by_target_id(stub):
    user = source("user", {"id": 1})
    fallback = http("prices", "/status/503")
    fallback.fallback.CopyFrom(json_value({"price": None}))
    failed = http("broken", "/status/500")
    call = stub.Collect(pb.AggregateRequest(targets=[user, fallback, failed]), timeout=5)
    response = await call
    merged = json_format.MessageToDict(response.merged)
    assert merged == {"user": {"id": 1}, "prices": {"price": None}}
    assert len(response.results) == 3
    assert dict(await call.trailing_metadata())["x-aggregate-fallback"] == "prices"


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    with redis_process() as (url, _):
        yield url


@contextlib.contextmanager
def redis_process() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A real redis-server on a free loopback port: its URL and its process (a test may stop,
    pause or kill it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test`, which installs it")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # wait for its own word that it is ready
            if "Ready to accept connections" in line:
                break
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused one must hear the terminate
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    with redis_server() as url:
        yield url


async def test_redis_cache_is_shared_by_replicas(start_server, rest, redis_url):
    upstream = cached_upstream(rest, backend="redis", redis_url=redis_url)
    _, first = await start_server(cached=upstream)
    _, second = await start_server(cached=upstream)
    miss, _, _, _ = await aggregate(first, http("a", "/count/k", upstream="cached"))
    hit, _, _, _ = await aggregate(second, http("a", "/count/k", upstream="cached"))
    assert miss[0].cache == pb.CACHE_STATUS_MISS
    assert hit[0].cache == pb.CACHE_STATUS_HIT
    assert hit[0].body == miss[0].body
    assert hit[0].content_type == miss[0].content_type
    assert rest.recorder.counts["k"] == 1


async def test_a_broken_redis_is_a_miss_not_a_failure(start_server, rest):
    dead = f"redis://127.0.0.1:{refused_port()}/0"
    _, stub = await start_server(cached=cached_upstream(rest, backend="redis", redis_url=dead))
    results, code, _, _ = await aggregate(stub, http("a", "/count/k", upstream="cached"))
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_OK
    assert results[0].cache == pb.CACHE_STATUS_MISS


async def test_substituted_values_are_checked_against_the_upstreams_rules(start_server, rest):
    small = {"kind": "http", "url": rest.url, "max_request_bytes": 64}
    _, stub = await start_server(small=small)
    user = source("user", {"big": "x" * 200})
    post = http(
        "post",
        "/echo",
        upstream="small",
        method="POST",
        json=json_value({"v": "{{user.big}}"}),
        depends_on=["user"],
    )
    results, code, _, _ = await aggregate(stub, user, post)
    failed = next(r for r in results if r.id == "post")
    assert code == grpc.StatusCode.OK
    assert failed.outcome == pb.OUTCOME_ERROR
    assert "exceeds upstreams.small.max_request_bytes (64)" in failed.error
    assert len(rest.recorder.requests) == 1  # only the user call went out


async def test_a_target_named_item_works_while_nothing_references_it(stub):
    item = source("item", {"sku": "A"})
    after = http("after", "/echo/x", depends_on=["item"])
    results, code, _, _ = await aggregate(stub, item, after)
    assert code == grpc.StatusCode.OK
    assert sorted(ids(results)) == ["after", "item"]


@pytest.mark.parametrize("for_each", ["", "{{item.skus}}"])
async def test_references_to_a_target_named_item_are_refused(stub, rest, for_each):
    # {{item}} is for_each's element (and nothing outside for_each): a target of that name
    # could never be read, so a reference to it is refused rather than left unresolvable.
    item = source("item", {"sku": "A", "skus": ["A", "B"]})
    detail = http("d", "/echo/{{item.sku}}", depends_on=["item"], for_each=for_each)
    results, code, details, _ = await aggregate(stub, item, detail)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    problem = "target 'd': depends_on names target 'item', but {{item}} is for_each's element"
    assert problem in details
    assert results == []
    assert rest.recorder.requests == []
