"""Errors that say whose fault they are (docs/api.md, "Status codes" and "Error details"): a
required REST target's status follows Google's HTTP mapping, and every non-OK status carries a
google.rpc.Status in grpc-status-details-bin, read here as a caller would."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http, rpc_target, wait_for
from tests.e2e.test_call_cli import run_call

KEY = "grpc-status-details-bin"


def rich_status(code: grpc.StatusCode, message: str, trailers: dict[str, Any]) -> status_pb2.Status:
    """The google.rpc.Status of a call, checked as grpcio-status checks it."""
    status = status_pb2.Status.FromString(trailers[KEY])
    assert status.code == code.value[0]
    assert status.message == message
    return status


def detail(status: status_pb2.Status, kind: type[Message]) -> Any:
    found = kind()
    for packed in status.details:
        if packed.Unpack(found):
            return found
    raise AssertionError(f"no {kind.DESCRIPTOR.full_name} in {status}")


async def aggregate(stub: Any, *targets: pb.Target, timeout: float = 5, metadata: Any = ()) -> Any:
    request = pb.AggregateRequest(targets=list(targets))
    return await collect(stub.Aggregate(request, timeout=timeout, metadata=metadata))


@pytest.mark.parametrize(
    ("http_status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),  # grpc's table: INTERNAL
        (401, grpc.StatusCode.UNAUTHENTICATED),
        (403, grpc.StatusCode.PERMISSION_DENIED),
        (404, grpc.StatusCode.NOT_FOUND),  # grpc's table: UNIMPLEMENTED
        (409, grpc.StatusCode.ABORTED),
        (412, grpc.StatusCode.FAILED_PRECONDITION),
        (418, grpc.StatusCode.FAILED_PRECONDITION),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (499, grpc.StatusCode.CANCELLED),
        (500, grpc.StatusCode.INTERNAL),
        (501, grpc.StatusCode.UNIMPLEMENTED),
        (502, grpc.StatusCode.UNAVAILABLE),
        (503, grpc.StatusCode.UNAVAILABLE),
        (504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (507, grpc.StatusCode.INTERNAL),
    ],
)
async def test_a_required_rest_target_maps_like_googles_apis(stub, http_status, code):
    _, got, message, trailers = await aggregate(
        stub, http("needed", f"/status/{http_status}", required=True)
    )
    assert got == code
    info = detail(rich_status(code, message, trailers), error_details_pb2.ErrorInfo)
    assert (info.domain, info.reason) == ("aggregator", "UPSTREAM_FAILED")
    assert dict(info.metadata) == {
        "target": "needed", "upstream": "rest", "outcome": "error",
        "http_status": str(http_status),
    }  # fmt: skip


async def test_a_required_grpc_target_names_its_code(stub):
    _, code, message, trailers = await aggregate(
        stub, rpc_target("lookup", "Fail", b"5", required=True)
    )
    assert code == grpc.StatusCode.NOT_FOUND
    info = detail(rich_status(code, message, trailers), error_details_pb2.ErrorInfo)
    assert info.reason == "UPSTREAM_FAILED"
    assert dict(info.metadata) == {
        "target": "lookup", "upstream": "rpc", "outcome": "error", "grpc_code": "5",
    }  # fmt: skip


async def test_a_skipped_required_target_names_the_dependency_that_failed(stub):
    _, code, message, trailers = await aggregate(
        stub,
        http("user", "/x", upstream="dead"),
        http("orders", "/delay/1", depends_on=["user"], required=True),
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    info = detail(rich_status(code, message, trailers), error_details_pb2.ErrorInfo)
    assert info.metadata["target"] == "user"
    assert info.metadata["upstream"] == "dead"
    assert info.metadata["outcome"] == "unavailable"


async def test_a_refused_request_carries_a_bad_request(stub, rest):
    _, code, message, trailers = await aggregate(
        stub, http("a", "/x", upstream="nowhere"), http("a", "/y")
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    bad = detail(rich_status(code, message, trailers), error_details_pb2.BadRequest)
    fields = [violation.field for violation in bad.field_violations]
    assert len(fields) == 2
    assert "targets[a].http.upstream" in fields  # named by its field, not by the caller's value
    assert rest.recorder.requests == []


async def test_a_bad_hop_count_is_a_bad_request_too(stub):
    _, code, message, trailers = await aggregate(
        stub, http("a", "/delay/1"), metadata=(("x-aggregator-hops", "many"),)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    bad = detail(rich_status(code, message, trailers), error_details_pb2.BadRequest)
    assert len(bad.field_violations) == 1


async def test_admission_says_which_quota_and_when_to_retry(start_server, rest):
    _, stub = await start_server(server={"max_concurrent_calls": 1})
    holding = stub.Aggregate(pb.AggregateRequest(targets=[http("h", "/hang")]), timeout=10)
    await wait_for(rest.recorder.hanging)
    _, code, message, trailers = await aggregate(stub, http("a", "/delay/1"))
    holding.cancel()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rich_status(code, message, trailers)
    assert detail(status, error_details_pb2.ErrorInfo).reason == "OVERLOADED"
    quota = detail(status, error_details_pb2.QuotaFailure)
    assert [v.subject for v in quota.violations] == ["server.max_concurrent_calls"]
    retry = detail(status, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToMilliseconds() == 100


async def test_an_upstreams_rate_limit_says_when_a_token_comes(start_server):
    _, stub = await start_server(
        limited={"kind": "http", "url": "http://127.0.0.1:1", "rate_limit": {"rate": 2, "burst": 1}}
    )
    # The first target takes the only token (and fails to connect); the second finds none
    # within its 50 ms: REJECTED.
    _, code, message, trailers = await aggregate(
        stub,
        http("first", "/x", upstream="limited"),
        http("second", "/x", upstream="limited", required=True, timeout={"nanos": 50_000_000}),
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rich_status(code, message, trailers)
    info = detail(status, error_details_pb2.ErrorInfo)
    assert info.reason == "UPSTREAM_LIMITED"
    assert info.metadata["target"] == "second"
    quota = detail(status, error_details_pb2.QuotaFailure)
    assert [v.subject for v in quota.violations] == ["upstreams.limited"]
    assert "rate limited" in quota.violations[0].description
    assert detail(status, error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() == 500


async def test_a_draining_server_says_to_retry(start_server, rest):
    server, stub = await start_server(server={"shutdown_grace": "5s"})
    holding = stub.Aggregate(pb.AggregateRequest(targets=[http("h", "/hang")]), timeout=10)
    await wait_for(rest.recorder.hanging)
    draining = asyncio.create_task(server.drain())
    while server._service is None or not server._service.draining:  # noqa: ASYNC110
        await asyncio.sleep(0)
    _, code, message, trailers = await aggregate(stub, http("a", "/delay/1"))
    holding.cancel()
    await draining
    assert code == grpc.StatusCode.UNAVAILABLE
    status = rich_status(code, message, trailers)
    assert detail(status, error_details_pb2.ErrorInfo).reason == "DRAINING"
    assert detail(status, error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() == 100


def metadata_size(trailers: dict[str, Any], message: str) -> int:
    """What grpc counts against its 8 KiB limit: each entry's key, value (a -bin value as
    base64) and 32 bytes, grpc-status and grpc-message included."""
    size = len("grpc-status") + 2 + 32 + len("grpc-message") + len(message.encode()) * 3 + 32
    for key, value in trailers.items():
        sent = base64.b64encode(value) if isinstance(value, bytes) else value.encode()
        size += len(key) + len(sent) + 32
    return size


async def test_details_keep_all_trailers_under_8_kib(start_server):
    """The fullest trailers there are: three full id lists, a full summary, a long message,
    and the details on top."""
    _, stub = await start_server(server={"max_targets": 300})
    long = "x" * 60
    targets = [http(f"{long}{n:03}", "/hang", timeout={"nanos": 1_000_000}) for n in range(100)] + [
        http(f"fb{long[2:]}{n:03}", "/x", upstream="dead", fallback={"string_value": "f"})
        for n in range(100)
    ]
    # Fails once the others have timed out or fallen back.
    targets.append(http("first", "/delay/20"))
    targets.append(http("n" * 64, "/status/503", depends_on=["first"], required=True))
    _, code, message, trailers = await aggregate(stub, *targets)
    assert code == grpc.StatusCode.UNAVAILABLE, message
    rich_status(code, message, trailers)
    assert trailers["x-aggregate-failed"].endswith(" more")
    assert trailers["x-aggregate-fallback"].endswith(" more")
    size = metadata_size(trailers, message)
    print(f"trailers with details: {size} bytes")
    assert size < 7.6 * 1024


async def test_the_deadline_sentence_names_the_margin(stub):
    results, _, _, _ = await aggregate(stub, http("slow", "/hang"), timeout=0.5)
    assert results[0].outcome == pb.OUTCOME_TIMEOUT
    # 0.5 s less the larger of 20 ms and 5%: the server stopped waiting at 475 ms.
    assert "less a 25ms margin) ran out first" in results[0].error
    assert "the call's deadline (budget " in results[0].error


async def test_aggregator_call_prints_the_details(start_server, tmp_path):
    aggregator, _ = await start_server()
    request = tmp_path / "request.yaml"
    request.write_text(
        "targets: [{id: must, http: {upstream: rest, path: /status/404}, required: true}]\n"
    )
    code, out, _ = await run_call("--address", f"127.0.0.1:{aggregator.port}", str(request))
    assert code == 1
    assert "status NOT_FOUND in " in out
    assert (
        "  ErrorInfo UPSTREAM_FAILED (aggregator): http_status=404 outcome=error target=must "
        "upstream=rest"
    ) in out.splitlines()
