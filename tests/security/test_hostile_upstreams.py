"""Hostile and broken upstreams, each a clear per-target outcome and never a crashed call or a
stuck task: raw TCP servers that lie, dribble, break off, redirect, answer 1xx or garbage, and
a gRPC upstream sending a message over the cap."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import duration_pb2

from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http, rpc_target
from tests.upstreams import Script, raw_upstream

CAP = 100_000  # max_response_bytes of the raw upstream
HANG = 30.0  # a pause longer than any test


def response(status: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    if "Content_Length" not in headers and "Transfer_Encoding" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def scripts(elsewhere: str) -> dict[str, Script]:
    return {
        "/bad-json": [response("200 OK", b"{not json", Content_Type="application/json")],
        "/big-declared": [
            response("200 OK", Content_Length=str(10 * CAP)) + b"x" * 1000,
            HANG,
        ],
        "/big-chunked": [
            response("200 OK", Transfer_Encoding="chunked"),
            *[chunk(b"y" * 16_384) for _ in range(10)],
            HANG,
        ],
        "/dribble": [
            response("200 OK", Content_Length="100"),
            *[step for _ in range(100) for step in (b"z", 0.1)],
        ],
        "/mid-close": [response("200 OK", Content_Length="100") + b"only ten..", None],
        "/short-length": [response("200 OK", Content_Length="5") + b"helloEXTRA-BYTES", HANG],
        "/redirect": [response("302 Found", Location=f"{elsewhere}/echo/stolen")],
        "/continue": [b"HTTP/1.1 100 Continue\r\n\r\n", response("200 OK", b"after 100")],
        "/early-hints": [
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n",
            response("200 OK", b"after 103"),
        ],
        "/switching": [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n",
            b"\x81\x05hello",
            HANG,
        ],
        "/only-100": [b"HTTP/1.1 100 Continue\r\n\r\n", None],
        "/garbage": [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", None],
        "/huge-header": [b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * 20_000 + b"\r\n\r\n"],
    }


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


@pytest.fixture
async def hostile(rest):
    async with raw_upstream(scripts(rest.url)) as upstream:
        yield upstream


@pytest.fixture
async def stub_to(start_server, hostile):
    _, stub = await start_server(
        hostile={"kind": "http", "url": hostile.url, "max_response_bytes": CAP, "timeout": "2s"}
    )
    return stub


async def one(stub, path: str, **fields) -> pb.TargetResult:
    target = http("t", path, upstream="hostile", **fields)
    results, code, _, _ = await collect(
        stub.Aggregate(pb.AggregateRequest(targets=[target]), timeout=5)
    )
    assert code == grpc.StatusCode.OK
    assert len(results) == 1
    return results[0]


async def test_invalid_json_with_decode_json_keeps_the_body_without_json(stub_to):
    result = await one(stub_to, "/bad-json", decode_json=True)
    assert result.outcome == pb.OUTCOME_OK
    assert result.body == b"{not json"
    assert not result.HasField("json")


async def test_a_declared_length_over_the_cap_is_refused_before_reading(stub_to):
    result = await one(stub_to, "/big-declared")
    assert result.outcome == pb.OUTCOME_ERROR
    assert result.error == (
        "response too large: hostile announced 1000000 bytes "
        "(upstreams.hostile.max_response_bytes is 100000)"
    )
    assert result.body == b""
    assert result.latency.ToNanoseconds() < 1e9


async def test_an_undeclared_body_is_read_only_up_to_the_cap(stub_to):
    result = await one(stub_to, "/big-chunked")
    assert result.outcome == pb.OUTCOME_ERROR
    assert result.error.startswith("response too large: hostile sent more than 100000 bytes")
    assert result.http_status == 200
    assert result.latency.ToNanoseconds() < 1e9  # stopped at the cap, not at the timeout


async def test_a_dribbling_upstream_times_out(stub_to):
    result = await one(stub_to, "/dribble", timeout=seconds(0.3))
    assert result.outcome == pb.OUTCOME_TIMEOUT
    assert result.error == "hostile did not answer within target timeout 300ms"


async def test_a_body_broken_off_mid_way_is_unavailable(stub_to):
    result = await one(stub_to, "/mid-close")
    assert result.outcome == pb.OUTCOME_UNAVAILABLE
    assert result.error.startswith("hostile broke off the response body")


async def test_a_content_length_shorter_than_the_body_never_leaks_the_surplus(stub_to):
    result = await one(stub_to, "/short-length")
    # The answer stops at the declared 5 bytes; the surplus is the next response's start, which
    # is broken, so the connection is dropped rather than reused.
    assert (result.outcome, result.body) in ((pb.OUTCOME_OK, b"hello"), (pb.OUTCOME_ERROR, b""))


async def test_a_redirect_is_the_answer_and_is_not_followed(stub_to, rest):
    result = await one(stub_to, "/redirect")
    assert result.outcome == pb.OUTCOME_ERROR
    assert result.http_status == 302
    assert result.error == "hostile answered HTTP 302 Found (redirects are not followed)"
    assert rest.recorder.requests == []


@pytest.mark.parametrize(
    ("path", "body"), [("/continue", b"after 100"), ("/early-hints", b"after 103")]
)
async def test_informational_responses_before_the_answer_are_skipped(stub_to, path, body):
    result = await one(stub_to, path)
    assert result.outcome == pb.OUTCOME_OK
    assert result.body == body


async def test_switching_protocols_is_an_error_not_an_upgrade(stub_to):
    result = await one(stub_to, "/switching")
    assert result.outcome == pb.OUTCOME_ERROR
    assert result.http_status == 101
    assert result.error == "hostile answered HTTP 101 Switching Protocols"


async def test_a_connection_closed_after_100_continue_is_unavailable(stub_to):
    result = await one(stub_to, "/only-100")
    assert result.outcome == pb.OUTCOME_UNAVAILABLE


@pytest.mark.parametrize("path", ["/garbage", "/huge-header"])
async def test_a_response_that_is_not_http_is_an_error(stub_to, path):
    result = await one(stub_to, path)
    assert result.outcome == pb.OUTCOME_ERROR
    assert result.error.startswith("hostile sent a broken response")


async def test_a_grpc_message_over_the_cap_is_an_error(start_server, rpc):
    _, stub = await start_server(
        capped={
            "kind": "grpc",
            "address": rpc.address,
            "max_request_bytes": 4 * 1024 * 1024,
            "max_response_bytes": 1024 * 1024,
        }
    )
    huge = b"m" * (2 * 1024 * 1024)  # Echo answers with the same 2 MiB
    target = rpc_target("huge", "Echo", huge, upstream="capped", required=True)
    results, code, details, _ = await collect(
        stub.Aggregate(pb.AggregateRequest(targets=[target]), timeout=5)
    )
    assert results[0].outcome == pb.OUTCOME_ERROR
    assert results[0].error.startswith(
        "response too large: capped sent a message over upstreams.capped.max_response_bytes "
        "(1048576)"
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "required target 'huge' failed: response too large" in details
    assert len(rpc.recorder.requests) == 1


async def test_every_hostile_upstream_at_once_ends_cleanly_with_no_task_left(stub_to, hostile):
    paths = sorted(hostile.scripts)
    targets = [
        http(path.strip("/"), path, upstream="hostile", timeout=seconds(0.5), decode_json=True)
        for path in paths
    ]
    results, code, _, trailers = await collect(
        stub_to.Aggregate(pb.AggregateRequest(targets=targets), timeout=5)
    )
    assert code == grpc.StatusCode.OK
    assert sorted(r.id for r in results) == sorted(t.id for t in targets)
    assert all(r.error for r in results if r.outcome != pb.OUTCOME_OK)
    assert "x-aggregate-summary-bin" in trailers
    assert [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("target ")] == []


async def test_garbage_answers_count_against_the_breaker(start_server, hostile):
    # Not HTTP at all (a wrong port, TLS spoken to plaintext): ERROR, but the upstream is not
    # healthy, so it trips the breaker as a 5xx would.
    _, stub = await start_server(
        hostile={
            "kind": "http",
            "url": hostile.url,
            "circuit_breaker": {"fail_max": 2, "reset_timeout": "30s"},
        }
    )
    outcomes = []
    for _ in range(3):
        result = await one(stub, "/garbage")
        outcomes.append(result.outcome)
    assert outcomes == [pb.OUTCOME_ERROR, pb.OUTCOME_ERROR, pb.OUTCOME_CIRCUIT_OPEN]
