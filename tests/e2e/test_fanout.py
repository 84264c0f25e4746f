"""Aggregate end to end: real server, real upstreams, every ending of a call."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http, ids, rpc_target, wait_for
from tests.upstreams import GrpcUpstream, RestUpstream

OK = pb.OUTCOME_OK


async def test_results_stream_in_completion_order_one_per_target(stub, rest):
    request = pb.AggregateRequest(
        targets=[http("slow", "/delay/300"), http("fast", "/delay/10"), http("mid", "/delay/150")]
    )
    results, code, _, trailers = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.OK
    assert ids(results) == ["fast", "mid", "slow"]
    assert all(r.outcome == OK and r.http_status == 200 and r.attempts == 1 for r in results)
    assert trailers["x-aggregate-completed"] == "true"
    assert trailers["x-aggregate-succeeded"] == "3"
    assert trailers["x-aggregate-failed"] == ""
    # Concurrent, not sequential: the sum of the calls is 460 ms.
    assert float(trailers["x-aggregate-elapsed-ms"]) < 450
    assert len(rest.recorder.requests) == 3


async def test_first_result_arrives_before_the_slowest_finishes(stub):
    request = pb.AggregateRequest(targets=[http("slow", "/delay/400"), http("fast", "/delay/1")])
    call = stub.Aggregate(request, timeout=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = await call.read()
    first_at = loop.time() - started
    second = await call.read()
    assert (first.id, second.id) == ("fast", "slow")
    assert first_at < second.latency.ToNanoseconds() / 1e9


async def test_decode_json_fills_json_and_leaves_non_json_bodies_alone(stub):
    request = pb.AggregateRequest(
        targets=[
            http("parsed", "/delay/1", decode_json=True),
            http("raw", "/delay/1"),
            http("text", "/text", decode_json=True),
        ]
    )
    results, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
    by_id = {r.id: r for r in results}
    assert code == grpc.StatusCode.OK
    assert by_id["parsed"].json.struct_value.fields["delay_ms"].number_value == 1
    assert by_id["parsed"].content_type.startswith("application/json")
    assert not by_id["raw"].HasField("json")
    assert json.loads(by_id["raw"].body) == {"delay_ms": 1}
    assert not by_id["text"].HasField("json")
    assert by_id["text"].body == b"plain words"


async def test_grpc_request_bytes_pass_through_untouched(stub, rpc: GrpcUpstream):
    payload = bytes(range(256))
    request = pb.AggregateRequest(
        targets=[rpc_target("echo", "Echo", payload, metadata={"x-tenant": "t1"})]
    )
    results, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.OK
    assert results[0].body == payload
    assert results[0].grpc_code == 0
    assert rpc.recorder.requests[0]["request"] == payload
    assert rpc.recorder.requests[0]["metadata"]["x-tenant"] == "t1"


async def test_http_call_sends_method_query_headers_and_json_body(stub, rest: RestUpstream):
    body = pb.HttpCall().json  # an empty Value to fill
    body.struct_value.fields["sku"].string_value = "A-1"
    target = http(
        "post",
        "/echo/items",
        method="POST",
        query={"q": "a b&c"},
        headers={"X-Tenant": "t1"},
        json=body,
        decode_json=True,
    )
    results, _, _, _ = await collect(stub.Aggregate(pb.AggregateRequest(targets=[target])))
    seen = json.loads(results[0].body)
    assert seen["method"] == "POST"
    assert seen["path"] == "/echo/items?q=a+b%26c"
    assert seen["query"] == {"q": "a b&c"}
    assert seen["headers"]["X-Tenant"] == "t1"
    assert seen["headers"]["Content-Type"] == "application/json"
    assert json.loads(seen["body"]) == {"sku": "A-1"}


async def test_optional_failure_is_partial_success(stub):
    request = pb.AggregateRequest(targets=[http("ok", "/delay/1"), http("broken", "/status/503")])
    results, code, _, trailers = await collect(stub.Aggregate(request, timeout=5))
    by_id = {r.id: r for r in results}
    assert code == grpc.StatusCode.OK
    assert by_id["broken"].outcome == pb.OUTCOME_ERROR
    assert by_id["broken"].http_status == 503
    assert "HTTP 503" in by_id["broken"].error
    assert trailers["x-aggregate-completed"] == "false"
    assert trailers["x-aggregate-succeeded"] == "1"
    assert trailers["x-aggregate-failed"] == "broken"
    summary = pb.AggregateSummary.FromString(trailers["x-aggregate-summary-bin"])
    assert (summary.targets, summary.succeeded, summary.failed) == (2, 1, 1)
    assert [(f.id, f.outcome) for f in summary.failures] == [("broken", pb.OUTCOME_ERROR)]


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/status/503", grpc.StatusCode.UNAVAILABLE),
        ("/status/404", grpc.StatusCode.NOT_FOUND),
        ("/status/401", grpc.StatusCode.UNAUTHENTICATED),
        ("/status/500", grpc.StatusCode.INTERNAL),
    ],
)
async def test_required_http_failure_maps_status_and_cancels_the_rest(
    stub, rest: RestUpstream, path, code
):
    request = pb.AggregateRequest(
        targets=[http("hang", "/hang"), http("needed", path, required=True)]
    )
    call = stub.Aggregate(request, timeout=5)
    results, got, details, trailers = await collect(call)
    assert got == code
    assert "required target 'needed' failed" in details
    assert {r.id: r.outcome for r in results} == {
        "needed": pb.OUTCOME_ERROR,
        "hang": pb.OUTCOME_CANCELLED,
    }
    assert trailers["x-aggregate-completed"] == "false"
    assert set(trailers["x-aggregate-failed"].split(",")) == {"needed", "hang"}
    await wait_for(rest.recorder.cancelled)


async def test_required_grpc_failure_takes_the_upstreams_code(stub):
    request = pb.AggregateRequest(targets=[rpc_target("lookup", "Fail", b"5", required=True)])
    results, code, details, _ = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "lookup" in details
    assert results[0].grpc_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_deadline_yields_partial_results_before_the_callers_deadline(stub, rest, rpc):
    request = pb.AggregateRequest(
        targets=[http("fast", "/delay/5"), http("stuck", "/hang"), rpc_target("rstuck", "Hang")]
    )
    results, code, _, trailers = await collect(stub.Aggregate(request, timeout=0.6))
    # The server answers itself, before grpc's own DEADLINE_EXCEEDED could fire.
    assert code == grpc.StatusCode.OK
    assert {r.id: r.outcome for r in results} == {
        "fast": OK,
        "stuck": pb.OUTCOME_TIMEOUT,
        "rstuck": pb.OUTCOME_TIMEOUT,
    }
    assert set(trailers["x-aggregate-timed-out"].split(",")) == {"stuck", "rstuck"}
    assert 500 <= int(trailers["x-aggregate-deadline-ms"]) <= 650
    assert "deadline" in next(r.error for r in results if r.id == "stuck")
    await wait_for(rest.recorder.cancelled)
    await wait_for(rpc.recorder.cancelled)


async def test_required_timeout_is_deadline_exceeded_with_trailers(stub):
    request = pb.AggregateRequest(targets=[http("stuck", "/hang", required=True)])
    results, code, details, trailers = await collect(stub.Aggregate(request, timeout=0.4))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "required target 'stuck'" in details
    assert results[0].outcome == pb.OUTCOME_TIMEOUT
    assert trailers["x-aggregate-timed-out"] == "stuck"


async def test_per_target_timeout_is_the_smallest_limit(stub):
    target = http("stuck", "/hang")
    target.timeout.FromMilliseconds(100)
    results, code, _, trailers = await collect(
        stub.Aggregate(pb.AggregateRequest(targets=[target]), timeout=5)
    )
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_TIMEOUT
    assert "target timeout 100ms" in results[0].error
    assert float(trailers["x-aggregate-elapsed-ms"]) < 1000


async def test_upstream_timeout_from_config_applies(start_server, rest):
    _, stub = await start_server(slow={"kind": "http", "url": rest.url, "timeout": "150ms"})
    request = pb.AggregateRequest(targets=[http("stuck", "/hang", upstream="slow")])
    results, _, _, _ = await collect(stub.Aggregate(request, timeout=5))
    assert results[0].outcome == pb.OUTCOME_TIMEOUT
    assert "upstream timeout 150ms" in results[0].error


async def test_an_upstreams_cookie_never_reaches_a_later_call(start_server, rest):
    """Upstream sessions are shared by every caller: a Set-Cookie answered to one call must not
    be sent on anyone's next request to that upstream. (By host name: aiohttp's default jar
    already ignores cookies from IP addresses.)"""
    by_name = rest.url.replace("127.0.0.1", "localhost")
    _, stub = await start_server(named={"kind": "http", "url": by_name})
    login = http("login", "/set-cookie", upstream="named", query={"value": "alice"})
    results, _, _, _ = await collect(stub.Aggregate(pb.AggregateRequest(targets=[login])))
    assert results[0].outcome == pb.OUTCOME_OK, results[0].error
    after = pb.AggregateRequest(targets=[http("next", "/echo", upstream="named")])
    await collect(stub.Aggregate(after, timeout=5))
    seen = {name.lower() for name in rest.recorder.requests[-1]["headers"]}
    assert rest.recorder.requests[-1]["path"].startswith("/echo")
    assert "cookie" not in seen


async def test_grpc_upstream_receives_the_time_left_as_its_deadline(stub, rpc: GrpcUpstream):
    request = pb.AggregateRequest(targets=[rpc_target("echo", "Echo", b"x")])
    await collect(stub.Aggregate(request, timeout=1.0))
    remaining = rpc.recorder.requests[0]["time_remaining"]
    assert remaining is not None
    assert 0.5 < remaining <= 1.0


async def test_caller_cancel_cancels_every_upstream_call(stub, rest, rpc):
    request = pb.AggregateRequest(
        targets=[http("a", "/hang"), http("b", "/hang"), rpc_target("c", "Hang")]
    )
    call = stub.Aggregate(request, timeout=10)
    for _ in range(2):
        await wait_for(rest.recorder.hanging)
    await wait_for(rpc.recorder.hanging)
    call.cancel()
    for _ in range(2):
        await wait_for(rest.recorder.cancelled)
    await wait_for(rpc.recorder.cancelled)
    assert rest.recorder.inflight == 0
    assert rpc.recorder.inflight == 0


async def test_cancelled_call_leaves_no_target_tasks(stub, rest):
    call = stub.Aggregate(pb.AggregateRequest(targets=[http("a", "/hang")]), timeout=10)
    await wait_for(rest.recorder.hanging)
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == "target a"]
    assert len(tasks) == 1
    call.cancel()
    done, pending = await asyncio.wait(tasks, timeout=5)
    assert not pending
    assert all(task.cancelled() for task in done)


async def test_connection_refused_is_unavailable(stub):
    request = pb.AggregateRequest(targets=[http("gone", "/x", upstream="dead")])
    results, code, _, trailers = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_UNAVAILABLE
    assert "could not connect" in results[0].error
    assert trailers["x-aggregate-failed"] == "gone"


async def test_connection_reset_is_unavailable(stub):
    request = pb.AggregateRequest(targets=[http("reset", "/reset")])
    results, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_UNAVAILABLE


async def test_required_unreachable_is_unavailable(stub):
    request = pb.AggregateRequest(targets=[http("gone", "/x", upstream="dead", required=True)])
    _, code, details, _ = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "gone" in details


async def test_batch_of_150_targets(start_server, rest):
    _, stub = await start_server(server={"max_targets": 200})
    targets = [http(f"t{i}", f"/delay/{i % 20}") for i in range(150)]
    results, code, _, trailers = await collect(
        stub.Aggregate(pb.AggregateRequest(targets=targets), timeout=10)
    )
    assert code == grpc.StatusCode.OK
    assert sorted(ids(results)) == sorted(t.id for t in targets)
    assert all(r.outcome == OK for r in results)
    assert trailers["x-aggregate-succeeded"] == "150"
    assert len(rest.recorder.requests) == 150


async def test_request_id_is_taken_echoed_and_forwarded(stub, rest, rpc):
    request = pb.AggregateRequest(targets=[http("a", "/delay/1"), rpc_target("b", "Echo")])
    call = stub.Aggregate(request, timeout=5, metadata=(("x-request-id", "req-42"),))
    await collect(call)
    assert dict(await call.initial_metadata())["x-request-id"] == "req-42"
    assert rest.recorder.requests[0]["headers"]["x-request-id"] == "req-42"
    assert rpc.recorder.requests[0]["metadata"]["x-request-id"] == "req-42"


async def test_request_id_is_generated_when_absent_or_malformed(stub, rest):
    request = pb.AggregateRequest(targets=[http("a", "/delay/1")])
    call = stub.Aggregate(request, timeout=5, metadata=(("x-request-id", "bad id; drop"),))
    await collect(call)
    generated = dict(await call.initial_metadata())["x-request-id"]
    assert generated != "bad id; drop"
    assert len(generated) == 32
    assert rest.recorder.requests[0]["headers"]["x-request-id"] == generated


async def test_fallback_replaces_a_failure_and_keeps_a_required_target_alive(stub):
    target = http("prices", "/status/503", required=True)
    target.fallback.struct_value.fields["price"].string_value = "n/a"
    request = pb.AggregateRequest(targets=[target, http("ok", "/delay/1")])
    results, code, _, trailers = await collect(stub.Aggregate(request, timeout=5))
    by_id = {r.id: r for r in results}
    assert code == grpc.StatusCode.OK
    assert by_id["prices"].outcome == OK
    assert by_id["prices"].from_fallback
    assert by_id["prices"].json.struct_value.fields["price"].string_value == "n/a"
    assert "HTTP 503" in by_id["prices"].error
    assert trailers["x-aggregate-fallback"] == "prices"
    assert trailers["x-aggregate-completed"] == "false"
    assert trailers["x-aggregate-succeeded"] == "2"


async def test_dependent_starts_after_its_dependency(stub):
    request = pb.AggregateRequest(
        targets=[
            http("user", "/delay/100"),
            http("orders", "/delay/1", depends_on=["user"]),
            http("free", "/delay/1"),
        ]
    )
    results, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
    by_id = {r.id: r for r in results}
    assert code == grpc.StatusCode.OK
    assert ids(results)[-1] == "orders"
    assert by_id["orders"].start_offset.ToNanoseconds() >= by_id["user"].latency.ToNanoseconds()
    assert by_id["free"].start_offset.ToNanoseconds() < by_id["user"].latency.ToNanoseconds()


async def test_failed_dependency_skips_dependents_and_required_takes_its_status(stub, rest):
    request = pb.AggregateRequest(
        targets=[
            http("user", "/status/503"),
            http("orders", "/delay/1", depends_on=["user"], required=True),
        ]
    )
    results, code, details, _ = await collect(stub.Aggregate(request, timeout=5))
    by_id = {r.id: r for r in results}
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "'orders'" in details
    assert "'user'" in details
    assert by_id["orders"].outcome == pb.OUTCOME_SKIPPED
    assert by_id["orders"].attempts == 0
    assert [r["path"] for r in rest.recorder.requests] == ["/status/503"]


async def test_collect_returns_results_and_a_merged_view(stub):
    request = pb.AggregateRequest(
        targets=[http("a", "/delay/1"), http("text", "/text"), http("bad", "/status/500")]
    )
    call = stub.Collect(request, timeout=5)
    response = await call
    trailers = dict(await call.trailing_metadata())
    assert sorted(r.id for r in response.results) == ["a", "bad", "text"]
    assert set(response.merged.fields) == {"a"}
    assert response.merged.fields["a"].struct_value.fields["delay_ms"].number_value == 1
    assert trailers["x-aggregate-failed"] == "bad"


async def test_admission_control_sheds_calls_over_the_limit(start_server, rest):
    _, stub = await start_server(server={"max_concurrent_calls": 1})
    first = stub.Aggregate(pb.AggregateRequest(targets=[http("a", "/hang")]), timeout=10)
    await wait_for(rest.recorder.hanging)
    second = stub.Aggregate(pb.AggregateRequest(targets=[http("b", "/delay/1")]), timeout=5)
    _, code, details, trailers = await collect(second)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrent_calls" in details
    assert trailers["x-aggregate-succeeded"] == "0"
    first.cancel()
    assert len(rest.recorder.requests) == 1


async def test_many_failures_keep_trailers_under_8_kib(start_server):
    _, stub = await start_server(server={"max_targets": 300})
    targets = [http(f"{i:03d}-" + "x" * 59, "/x", upstream="dead") for i in range(300)]
    results, code, _, trailers = await collect(
        stub.Aggregate(pb.AggregateRequest(targets=targets), timeout=10)
    )
    assert code == grpc.StatusCode.OK
    assert len(results) == 300
    size = sum(len(k) + len(v) for k, v in trailers.items())
    assert size < 8 * 1024
    assert trailers["x-aggregate-failed"].endswith(" more")
    summary = pb.AggregateSummary.FromString(trailers["x-aggregate-summary-bin"])
    assert summary.failed == 300
    assert summary.failures_omitted == 300 - len(summary.failures) > 0
