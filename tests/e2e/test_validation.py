"""Malformed requests through the real server: INVALID_ARGUMENT, trailers, nothing sent upstream."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2

from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import TRAILER_KEYS, collect, http, rpc_target
from tests.upstreams import GrpcUpstream, RestUpstream


def nothing_sent(rest: RestUpstream, rpc: GrpcUpstream) -> bool:
    return rest.recorder.requests == [] and rpc.recorder.requests == []


async def test_every_problem_is_named_with_its_target_and_nothing_is_sent(stub, rest, rpc):
    request = pb.AggregateRequest(
        targets=[
            http("evil-path", "http://evil.example/x"),
            http("smuggler", "/echo", headers={"Transfer-Encoding": "chunked"}),
            rpc_target("loud", "Echo", metadata={"X-Upper": "v"}),
            http("lost", "/echo", upstream="nowhere"),
            rpc_target("confused", "Echo", upstream="rest"),
        ]
    )
    results, code, details, _ = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert results == []
    for target_id, field in [
        ("evil-path", "http.path"),
        ("smuggler", "http.headers"),
        ("loud", "grpc.metadata"),
        ("lost", "http.upstream"),
        ("confused", "grpc.upstream"),
    ]:
        assert f"'{target_id}': {field}" in details
    assert rest.recorder.requests == []
    assert rpc.recorder.requests == []


async def test_valid_targets_do_not_run_when_another_target_is_invalid(stub, rest, rpc):
    request = pb.AggregateRequest(
        targets=[
            http("fine", "/echo/from-the-refused-call"),
            rpc_target("fine-rpc", "Echo", b"from-the-refused-call"),
            http("traversal", "/%2e%2e/admin"),
        ]
    )
    results, code, details, trailers = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert results == []
    assert "'traversal'" in details
    assert "fine" not in details
    assert trailers["x-aggregate-succeeded"] == "0"
    assert rest.recorder.requests == []
    assert rpc.recorder.requests == []
    # A valid call afterwards reaches both upstreams: they were there to be reached, and what they
    # record is this call's traffic only, never the refused call's.
    follow_up = pb.AggregateRequest(
        targets=[http("after", "/echo/follow-up"), rpc_target("after-rpc", "Echo", b"follow-up")]
    )
    _, code, _, _ = await collect(stub.Aggregate(follow_up, timeout=5))
    assert code == grpc.StatusCode.OK
    assert [seen["path"] for seen in rest.recorder.requests] == ["/echo/follow-up"]
    assert [seen["request"] for seen in rpc.recorder.requests] == [b"follow-up"]


async def test_refused_call_still_ends_with_every_trailer(stub, rest, rpc):
    request = pb.AggregateRequest(targets=[http("ok", "/echo"), http("bad", "echo")])
    call = stub.Aggregate(request, timeout=5, metadata=(("x-request-id", "refused-42"),))
    _, code, _, trailers = await collect(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(trailers) >= TRAILER_KEYS
    assert trailers["x-aggregate-succeeded"] == "0"
    assert trailers["x-aggregate-timed-out"] == ""
    assert trailers["x-aggregate-fallback"] == ""
    # grpc rounds the timeout it sends up (by ~10 ms at 5 s): the budget may exceed 5000.
    assert 0 < int(trailers["x-aggregate-deadline-ms"]) <= 5200
    assert float(trailers["x-aggregate-elapsed-ms"]) >= 0
    summary = pb.AggregateSummary.FromString(trailers["x-aggregate-summary-bin"])
    assert (summary.succeeded, summary.timed_out, summary.fallback) == (0, 0, 0)
    assert dict(await call.initial_metadata())["x-request-id"] == "refused-42"
    assert nothing_sent(rest, rpc)


async def test_refused_call_is_not_reported_as_completed(stub, rest, rpc):
    request = pb.AggregateRequest(targets=[http("bad", "//evil.example/x")])
    _, code, _, trailers = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # docs/api.md: "true iff every target's outcome is OK"; this target never ran.
    assert trailers["x-aggregate-completed"] == "false"
    assert nothing_sent(rest, rpc)


MALFORMED = {
    "empty-batch": ([], "targets"),
    "bad-id": ([http("has space", "/echo")], "targets[0].id"),
    "duplicate-id": ([http("twin", "/echo"), rpc_target("twin", "Echo")], "'twin'"),
    "no-call": ([pb.Target(id="idle")], "'idle'"),
    "crlf-path": ([http("split", "/echo\r\nHost: evil")], "http.path"),
    "dotdot-path": ([http("up", "/echo/../admin")], "http.path"),
    "host-header": ([http("steer", "/echo", headers={"Host": "evil"})], "http.headers"),
    "crlf-header": ([http("inject", "/echo", headers={"X-A": "1\r\nX-B: 2"})], "http.headers"),
    "bad-method": ([http("verb", "/echo", method="BREW")], "http.method"),
    "bad-grpc-method": (
        [pb.Target(id="m", grpc=pb.GrpcCall(upstream="rpc", method="Echo"))],
        "grpc.method",
    ),
    "reserved-metadata": (
        [rpc_target("spoof", "Echo", metadata={"x-request-id": "x"})],
        "grpc.metadata",
    ),
    "binary-metadata": ([rpc_target("bin", "Echo", metadata={"blob-bin": "x"})], "grpc.metadata"),
    "zero-timeout": ([http("now", "/echo", timeout=duration_pb2.Duration())], "timeout"),
    "unknown-dependency": ([http("waits", "/echo", depends_on=["ghost"])], "'ghost'"),
    "self-dependency": ([http("loop", "/echo", depends_on=["loop"])], "'loop'"),
    "cycle": (
        [http("hen", "/echo", depends_on=["egg"]), http("egg", "/echo", depends_on=["hen"])],
        "cycle",
    ),
    "for-each": ([http("each", "/echo", for_each="{{list.items}}")], "for_each"),
}


@pytest.mark.parametrize(("targets", "named"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_is_refused_before_anything_is_sent(
    stub, rest, rpc, targets, named
):
    request = pb.AggregateRequest(targets=targets)
    results, code, details, trailers = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert named in details
    assert results == []
    assert trailers["x-aggregate-succeeded"] == "0"
    assert rest.recorder.requests == []
    assert rpc.recorder.requests == []


async def test_oversized_batch_is_refused_naming_the_limit(start_server, rest, rpc):
    _, stub = await start_server(server={"max_targets": 2})
    request = pb.AggregateRequest(
        targets=[http("a", "/echo"), http("b", "/echo"), rpc_target("c", "Echo")]
    )
    results, code, details, trailers = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "server.max_targets (2)" in details
    assert results == []
    assert set(trailers) >= TRAILER_KEYS
    assert rest.recorder.requests == []
    assert rpc.recorder.requests == []


async def test_collect_refuses_a_malformed_request_the_same_way(stub, rest, rpc):
    request = pb.AggregateRequest(
        targets=[http("fine", "/echo"), rpc_target("wrong-kind", "Echo", upstream="rest")]
    )
    call = stub.Collect(request, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'wrong-kind': grpc.upstream" in (raised.value.details() or "")
    trailers = dict(await call.trailing_metadata() or ())
    assert set(trailers) >= TRAILER_KEYS
    assert trailers["x-aggregate-succeeded"] == "0"
    assert rest.recorder.requests == []
    assert rpc.recorder.requests == []
