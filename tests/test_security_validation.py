"""Issue 17, request validation: each attack tried through the real server on loopback against
real upstreams that count what reaches them. A refused request sends nothing anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import statistics
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.config import config_from_mapping, load_config
from aggregator.errors import InvalidRequest
from aggregator.plan import HttpRequest, make_plan
from aggregator.security.outbound import plan_problems, target_problems
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http, rpc_target
from tests.test_auth import AUDIENCE, ISSUER, bearer, public_pem, rsa_key, token
from tests.test_config import key_paths, problems_of, spoiled
from tests.upstreams import GrpcUpstream, RawUpstream, RestUpstream, raw_upstream


def nothing_sent(rest: RestUpstream, rpc: GrpcUpstream) -> bool:
    return rest.recorder.requests == [] and rpc.recorder.requests == []


def json_value(raw: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.update(raw)
    return value


async def aggregate(stub: Any, *targets: pb.Target, **kwargs: Any) -> Any:
    request = pb.AggregateRequest(targets=list(targets))
    return await collect(stub.Aggregate(request, timeout=10, **kwargs))


def by_id(results: list[pb.TargetResult]) -> dict[str, pb.TargetResult]:
    return {result.id: result for result in results}


def dependency(target_id: str, body: Any) -> pb.Target:
    """A target answered with ``body`` as JSON by the rest upstream's /json."""
    return http(target_id, "/json", query={"body": json.dumps(body)})


# Finding 1: a body on GET (CL.0 request smuggling) ----------------------------------------------


class _CountingHandler(BaseHTTPRequestHandler):
    """Python's http.server in HTTP/1.1: it does not read a GET's body, so a body it is sent is
    parsed as the next request on the connection (the issue's reproduction)."""

    protocol_version = "HTTP/1.1"
    seen: list[str]
    lock: threading.Lock

    def do_GET(self) -> None:
        with self.lock:
            self.seen.append(self.path)
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def stdlib_http_server() -> Iterator[tuple[str, list[str]]]:
    """http.server on a free loopback port, in its own thread; yields its URL and the paths
    of the requests it parsed."""
    seen: list[str] = []
    handler = type("Handler", (_CountingHandler,), {"seen": seen, "lock": threading.Lock()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


SMUGGLED = b"GET /admin/secret HTTP/1.1\r\nHost: upstream\r\n\r\n"


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
@pytest.mark.parametrize("payload", ["body", "json"])
async def test_a_body_on_a_bodiless_method_is_refused_and_nothing_is_sent(
    start_server, rest, rpc, method, payload
):
    with stdlib_http_server() as (url, seen):
        rules = {"path_prefixes": ["/public/"], "allowed_methods": ["GET", "HEAD", "OPTIONS"]}
        _, stub = await start_server(stdlib={"kind": "http", "url": url, **rules})
        body: dict[str, Any] = (
            {"body": SMUGGLED} if payload == "body" else {"json": json_value({"a": 1})}
        )
        smuggler = http("smuggler", "/public/page", upstream="stdlib", method=method, **body)
        results, code, details, _ = await aggregate(stub, smuggler)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"target 'smuggler': http.{payload}: a {method} request carries no body" in details
        assert results == []
        # An honest call afterwards is the only request the upstream ever parsed.
        results, code, _, _ = await aggregate(stub, http("page", "/public/page", upstream="stdlib"))
        assert code == grpc.StatusCode.OK
        assert seen == ["/public/page"]
    assert nothing_sent(rest, rpc)


async def test_bodies_from_substitution_or_for_each_on_get_are_refused(stub, rest, rpc):
    substituted = http(
        "substituted",
        "/echo",
        json=json_value({"smuggled": "{{dep.request}}"}),
        depends_on=["dep"],
    )
    each = http(
        "each",
        "/echo",
        method="OPTIONS",
        json=json_value({"id": "{{item}}"}),
        depends_on=["dep"],
        for_each="{{dep.items}}",
    )
    dep = dependency("dep", {"request": SMUGGLED.decode(), "items": [1, 2]})
    results, code, details, _ = await aggregate(stub, dep, substituted, each)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "target 'substituted': http.json: a GET request carries no body" in details
    assert "target 'each': http.json: a OPTIONS request carries no body" in details
    assert results == []
    assert nothing_sent(rest, rpc)  # not even the dependency


def test_a_final_request_with_a_body_on_get_breaks_the_upstreams_rules():
    config = config_from_mapping({"upstreams": {"rest": {"kind": "http", "url": "http://h"}}})
    request = HttpRequest("GET", "/x", (), (), SMUGGLED)
    problems = target_problems(config.upstreams["rest"], request, "late")
    assert problems == ["target 'late': http body: a GET request carries no body"]


async def test_an_empty_body_on_get_goes_without_content_length(stub, rest):
    _, code, _, _ = await aggregate(stub, http("page", "/echo/x", body=b""))
    assert code == grpc.StatusCode.OK
    (seen,) = rest.recorder.requests
    assert "content-length" not in seen["headers"]
    assert "transfer-encoding" not in seen["headers"]


# Finding 2: validation linear in the request, authorization before planning ----------------------


def the_issues_request(n: int = 8000) -> pb.AggregateRequest:
    """120 KB: n duplicate depends_on entries and n references (2 s of loop time before)."""
    dep = http("dep", "/echo/dep")
    path = "/echo/" + "/".join(["{{dep.x}}"] * n)
    return pb.AggregateRequest(targets=[dep, http("b", path, depends_on=["dep"] * n)])


async def test_the_issues_request_is_refused_at_once_without_stalling_the_loop(
    start_server, rest, rpc
):
    server, stub = await start_server()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    request = the_issues_request()
    assert request.ByteSize() > 120_000
    await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    stop = asyncio.Event()

    async def probe() -> float:
        """The longest wait of health checks sent while the big call runs."""
        longest = 0.0
        for _ in range(1000):
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            longest = max(longest, time.perf_counter() - started)
            if stop.is_set():
                break
        return longest

    try:
        prober = asyncio.create_task(probe())
        started = time.perf_counter()
        call = stub.Collect(request, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        elapsed = time.perf_counter() - started
        stop.set()
        longest_health_wait = await prober
    finally:
        await channel.close()
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = await call.details()
    assert "target 'b': depends_on: 8000 entries exceed 64 per target" in details
    # Before the fix: about 1 s for the call, and the health checks waited as long.
    assert elapsed < 0.5, elapsed
    assert longest_health_wait < 0.5, longest_health_wait
    assert nothing_sent(rest, rpc)


BIG_CONFIG = config_from_mapping(
    {
        "server": {"max_targets": 100_000},
        "upstreams": {"rest": {"kind": "http", "url": "http://127.0.0.1:8081"}},
    }
)


def many_targets(n: int) -> pb.AggregateRequest:
    """n valid targets, each depending on the same 64 roots with 200 references in a long
    path, query, headers and a JSON body: every part of planning has work to do, the same
    for each target."""
    roots = [http(f"r{j}", "/r") for j in range(64)]
    deps = [root.id for root in roots]
    refs = [f"{{{{{dep}.a.b}}}}" for dep in deps[:50]]
    targets = [
        http(
            f"t{i}",
            "/echo/" + "/".join(["segment", *refs]),
            method="POST",
            query={"q": "".join(refs), "r": "x" * 100},
            headers={"X-A": "".join(refs), "X-B": "y" * 100},
            json=json_value({"k": refs, "long": "z" * 200}),
            depends_on=deps,
        )
        for i in range(n)
    ]
    return pb.AggregateRequest(targets=[*roots, *targets])


def one_long_target(n: int) -> pb.AggregateRequest:
    """One target at the caps (64 depends_on, 256 references) whose templates grow with n,
    full of braces that are nearly references."""
    roots = [http(f"r{j}", "/r") for j in range(64)]
    refs = "".join(f"{{{{r{j % 64}.v}}}}" for j in range(256))
    noise = "{{ not-a-reference {" * n
    target = http(
        "t",
        "/echo",
        method="POST",
        depends_on=[root.id for root in roots],
        headers={"X-A": noise},
        query={"q": noise},
        json=json_value({"refs": refs, "noise": [noise] * 4}),
    )
    return pb.AggregateRequest(targets=[*roots, target])


def many_problems(n: int) -> pb.AggregateRequest:
    """n targets, each wrong in many ways: every problem must be found and named."""
    return pb.AggregateRequest(
        targets=[
            http(
                f"t{i}",
                "/a/../" + "{{nobody.x}}" * 300,
                method="GET",
                body=b"x",
                headers={f"X-Forwarded-{k}": "\x0b" for k in range(20)},
                depends_on=["ghost", "ghost", f"t{i}"],
            )
            for i in range(n)
        ]
    )


def plan_time(request: pb.AggregateRequest) -> float:
    """How long make_plan and the upstreams' rules take to accept or refuse ``request``."""
    started = time.perf_counter()
    with contextlib.suppress(InvalidRequest):
        plan_problems(make_plan(request, BIG_CONFIG))
    return time.perf_counter() - started


def median_times(*requests: pb.AggregateRequest, runs: int = 7) -> list[float]:
    """The median plan_time of each request, measured in turns so that a change in the
    machine's load touches all of them. The garbage collector is off meanwhile: a collection
    costs in proportion to all the test process holds (which earlier tests grew), not to
    the request."""
    times: list[list[float]] = [[] for _ in requests]
    gc.collect()
    gc.disable()
    try:
        for _ in range(runs):
            for measured, request in zip(times, requests, strict=True):
                measured.append(plan_time(request))
    finally:
        gc.enable()
    return [statistics.median(measured) for measured in times]


@pytest.mark.parametrize(
    ("make", "n"),
    [
        (many_targets, 100),
        (one_long_target, 20_000),
        (many_problems, 100),
        (the_issues_request, 4000),
    ],
    ids=["many-valid-targets", "one-long-target", "many-problems", "the-issues-shape"],
)
def test_planning_time_grows_linearly_with_the_request(make: Callable[..., Any], n: int):
    small, large = make(n), make(2 * n)
    assert 1.8 < large.ByteSize() / small.ByteSize() < 2.2
    small_time, large_time = median_times(small, large)
    # Under 5 ms a time is mostly the machine's noise: it counts as 5 ms.
    ratio = large_time / max(small_time, 0.005)
    assert ratio < 3.0, f"doubling the request multiplied planning time by {ratio:.2f}"


@pytest.fixture
def web_caller(tmp_path: Path) -> tuple[dict[str, Any], tuple[tuple[str, str], ...]]:
    """An auth section where caller 'web' may call the rest upstream only; its metadata."""
    key = rsa_key()
    public = tmp_path / "issuer.pem"
    public.write_bytes(public_pem(key))
    auth = {
        "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "keys": [str(public)]},
        "callers": {"web": {"token_subject": "web-frontend", "upstreams": ["rest"]}},
    }
    return auth, bearer(token(key))


async def test_an_unauthorized_caller_is_denied_before_its_request_is_planned(
    start_server, web_caller, rest, rpc
):
    auth, credentials = web_caller
    _, stub = await start_server(None, auth)
    # Nearly 4 MiB, and invalid in every way planning would find: it is never planned.
    targets = [
        rpc_target(f"t{i}", "Echo", b"x" * 400, metadata={"x-forwarded-for": "1"} if i else {})
        for i in range(8000)
    ]
    targets.append(http("wide", "/echo/" + "{{x.y}}" * 20_000, depends_on=["x"] * 20_000))
    request = pb.AggregateRequest(targets=targets)
    assert request.ByteSize() > 3_500_000
    started = time.perf_counter()
    results, code, details, _ = await collect(
        stub.Aggregate(request, timeout=20, metadata=credentials)
    )
    elapsed = time.perf_counter() - started
    assert code == grpc.StatusCode.PERMISSION_DENIED, details
    assert details.startswith("caller 'web' may not call upstream 'rpc' (targets 't0', 't1'")
    assert results == []
    assert elapsed < 2.0, elapsed  # the transfer of 4 MiB, and one pass over the names
    assert nothing_sent(rest, rpc)


async def test_permission_is_decided_before_the_request_is_checked(
    start_server, web_caller, rest, rpc
):
    auth, credentials = web_caller
    _, stub = await start_server(None, auth)
    bad = rpc_target("bad", "Echo", metadata={"X-Upper": "v"}, depends_on=["ghost"])
    _, code, details, _ = await aggregate(stub, bad, metadata=credentials)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "ghost" not in details
    assert nothing_sent(rest, rpc)


# Finding 6: length caps on paths, queries and method names ---------------------------------------


async def test_paths_queries_and_method_names_over_max_path_bytes_are_refused(stub, rest, rpc):
    results, code, details, _ = await aggregate(
        stub,
        http("long-path", "/echo/" + "p" * 1_000_000),
        http("long-query", "/echo", query={"q": "v" * 8200}),
        rpc_target("long-method", "E" * 9000),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "target 'long-path': http.path: 1000006 bytes exceed server.max_path_bytes (8192)" in (
        details
    )
    assert (
        "target 'long-query': http.query: 8203 bytes of names and values exceed "
        "server.max_path_bytes (8192)"
    ) in details
    assert "target 'long-method': grpc.method: 9015 bytes exceed server.max_path_bytes" in details
    assert results == []
    assert len(details) < 4096
    assert nothing_sent(rest, rpc)


async def test_a_path_that_substitution_makes_too_long_is_not_sent(start_server, rest):
    _, stub = await start_server(server={"max_path_bytes": 1024})
    dep = dependency("dep", {"v": "w" * 500})
    grown = http("grown", "/echo/{{dep.v}}/{{dep.v}}/{{dep.v}}", depends_on=["dep"])
    results, code, _, _ = await aggregate(stub, dep, grown)
    assert code == grpc.StatusCode.OK
    result = by_id(results)["grown"]
    assert result.outcome == pb.OUTCOME_ERROR
    assert "http.path: 1508 bytes exceed server.max_path_bytes (1024)" in result.error
    assert [seen["path"].split("?")[0] for seen in rest.recorder.requests] == ["/json"]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("8k", "'8k' is not an integer"),
        (63, "63 must be at least 64"),
        (2 * 1024 * 1024, "2097152 must be at most 1048576"),
    ],
)
def test_max_path_bytes_is_validated_naming_its_key_path(value, words):
    problems = problems_of(spoiled(server__max_path_bytes=value))
    assert key_paths(problems) == ["server.max_path_bytes"]
    assert words in problems[0]


def test_max_path_bytes_defaults_to_8_kib_and_can_be_set():
    assert config_from_mapping({}).server.max_path_bytes == 8192
    config = config_from_mapping(spoiled(server__max_path_bytes=512))
    assert config.server.max_path_bytes == 512


# Finding 10: rule bypasses by upstream normalization ---------------------------------------------

RULED = {"path_prefixes": ["/echo/public/"], "allowed_methods": ["GET"]}
BYPASSES = {
    "semicolon": "/echo/public/..;/admin",
    "encoded-semicolon": "/echo/public/..%3b/admin",
    "encoded-backslash": "/echo/public/..%5cadmin",
    "double-encoded": "/echo/public/%252e%252e/admin",
    "double-encoded-slash": "/echo/public%252F..%252Fadmin",
    "nul": "/echo/public/secret%00.json",
    "overlong-utf8": "/echo/public/%c0%ae%c0%ae/admin",
    "fullwidth-dots": "/echo/public/\uff0e\uff0e/admin",
    "encoded-fullwidth-dots": "/echo/public/%EF%BC%8E%EF%BC%8E/admin",
    "fullwidth-solidus": "/echo/public\uff0f..\uff0fadmin",
}


async def test_paths_that_an_upstream_could_normalize_out_of_its_prefixes_are_refused(
    start_server, rest, rpc
):
    _, stub = await start_server(web={"kind": "http", "url": rest.url, **RULED})
    targets = [http(name, path, upstream="web") for name, path in BYPASSES.items()]
    results, code, details, _ = await aggregate(stub, *targets)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for name in BYPASSES:
        assert f"target '{name}': http.path" in details
    assert results == []
    assert nothing_sent(rest, rpc)


@pytest.mark.parametrize("value", ["..;", "%2e%2e", "..\\", "\uff0e\uff0e", ".."])
async def test_substituted_values_cannot_leave_the_prefixes_either(start_server, rest, value):
    _, stub = await start_server(web={"kind": "http", "url": rest.url, **RULED})
    dep = dependency("dep", {"v": value})
    escape = http("escape", "/echo/public/{{dep.v}}/admin", upstream="web", depends_on=["dep"])
    results, code, _, _ = await aggregate(stub, dep, escape)
    assert code == grpc.StatusCode.OK
    result = by_id(results)["escape"]
    assert result.outcome == pb.OUTCOME_ERROR
    assert "path" in result.error
    assert [seen["path"].split("?")[0] for seen in rest.recorder.requests] == ["/json"]


STEERING = [
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "X-Original-URL",
    "X-Rewrite-URL",
    "content_length",
    "transfer_encoding",
    "X-Forwarded-For",
    "X_Forwarded_For",
    "X-Forwarded-Host",
    "Forwarded",
    "X-Real-IP",
    "X-Forwarded-Client-Cert",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
]


async def test_headers_that_remethod_reroute_or_reidentify_are_refused(stub, rest, rpc):
    targets = [
        http(f"h{index}", "/echo", headers={name: "POST"}) for index, name in enumerate(STEERING)
    ]
    targets.append(rpc_target("meta", "Echo", metadata={"x-forwarded-client-cert": "By=x"}))
    results, code, details, _ = await aggregate(stub, *targets)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # The message lists the problems while they fit (errors.MAX_PROBLEMS_SIZE), then counts.
    shown = [
        i for i, name in enumerate(STEERING) if f"target 'h{i}': http.headers: {name!r}" in details
    ]
    assert shown == list(range(len(shown)))
    assert len(shown) >= 8
    assert f"and {len(STEERING) + 1 - len(shown)} more problems" in details
    assert results == []
    assert nothing_sent(rest, rpc)


async def test_allowed_headers_lets_an_upstream_receive_a_header_on_purpose(
    start_server, rest, rpc
):
    _, stub = await start_server(
        trusting={"kind": "http", "url": rest.url, "allowed_headers": ["X-Forwarded-For"]},
        trusting_rpc={
            "kind": "grpc",
            "address": rpc.address,
            "allowed_headers": ["x-forwarded-for"],
        },
    )
    _, code, details, _ = await aggregate(
        stub,
        http("fwd", "/echo", upstream="trusting", headers={"X-Forwarded-For": "10.1.2.3"}),
        rpc_target("meta", "Echo", upstream="trusting_rpc", metadata={"x-forwarded-for": "10.9"}),
    )
    assert code == grpc.StatusCode.OK, details
    assert rest.recorder.requests[0]["headers"]["x-forwarded-for"] == "10.1.2.3"
    assert rpc.recorder.requests[0]["metadata"]["x-forwarded-for"] == "10.9"
    # Elsewhere, and in its underscore spelling, it is still refused.
    _, code, details, _ = await aggregate(
        stub,
        http("plain", "/echo", headers={"X-Forwarded-For": "10.1.2.3"}),
        http("under", "/echo", upstream="trusting", headers={"X_Forwarded_For": "10.1.2.3"}),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'plain'" in details
    assert "'under'" in details
    assert len(rest.recorder.requests) == 1


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (["Content-Length"], "is a hop-by-hop or framing header and is never sent"),
        (["transfer_encoding"], "is a hop-by-hop or framing header and is never sent"),
        (["X-Tenant"], "is not refused by default"),
        (["bad header"], "is not a header name"),
        ("x-forwarded-for", "is not a list of non-empty strings"),
    ],
)
def test_allowed_headers_is_validated_naming_its_key_path(value, words):
    problems = problems_of(spoiled(upstreams__catalog__allowed_headers=value))
    assert key_paths(problems) == ["upstreams.catalog.allowed_headers"]
    assert words in problems[0]


def test_allowed_headers_are_kept_lowercase():
    config = config_from_mapping(
        spoiled(upstreams__pricing__allowed_headers=["X-Forwarded-For", "Forwarded"])
    )
    assert config.upstreams["pricing"].allowed_headers == ("x-forwarded-for", "forwarded")
    assert config.upstreams["catalog"].allowed_headers == ()


# Finding 12: one check for every header value ----------------------------------------------------

CONTROLS = ["a\x0bb", "a\x1b[31mb", "a\x0cb", "a\x7fb", "a\x85b", "a\u2028b"]


@pytest.fixture
async def sink() -> AsyncIterator[RawUpstream]:
    """A raw TCP upstream that records every request head it reads (and answers nothing)."""
    async with raw_upstream({}) as upstream:
        yield upstream


@pytest.mark.parametrize("value", CONTROLS)
async def test_substituted_header_values_get_the_same_check_as_direct_ones(
    start_server, rest, sink, value
):
    _, stub = await start_server(sink={"kind": "http", "url": sink.url, "timeout": "1s"})
    dep = dependency("dep", {"v": value})
    injected = http(
        "injected", "/x", upstream="sink", headers={"X-A": "{{dep.v}}"}, depends_on=["dep"]
    )
    results, code, _, _ = await aggregate(stub, dep, injected)
    assert code == grpc.StatusCode.OK
    result = by_id(results)["injected"]
    assert result.outcome == pb.OUTCOME_ERROR
    assert "value contains control characters" in result.error
    assert sink.requests == []
    assert sink.connections == 0
    # The same value set directly, or as gRPC metadata, is refused the same way.
    _, code, details, _ = await aggregate(
        stub,
        http("direct", "/x", upstream="sink", headers={"X-A": value}),
        rpc_target("meta", "Echo", metadata={"x-a": value}),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "target 'direct': http.headers['X-A']: value contains control characters" in details
    assert "target 'meta': grpc.metadata['x-a']: value must be printable ASCII" in details
    assert sink.connections == 0


# Finding 13: deeply nested JSON from a dependency -------------------------------------------------


def _answer(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


DEEP = b"[" * 200_000 + b"]" * 200_000  # 400 KB, under max_response_bytes (1 MiB)
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000


@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT], ids=["arrays", "objects"])
async def test_deeply_nested_json_in_a_dependency_is_a_clear_per_target_error(
    start_server, rest, caplog, body
):
    async with raw_upstream({"/deep": [_answer(body)]}) as deep:
        _, stub = await start_server(deep={"kind": "http", "url": deep.url})
        results, code, details, _ = await aggregate(
            stub,
            http("deep", "/deep", upstream="deep", decode_json=True),
            http("use", "/echo/{{deep.a}}", depends_on=["deep"]),
            http("each", "/echo/{{item}}", depends_on=["deep"], for_each="{{deep}}"),
        )
    assert code == grpc.StatusCode.OK, details
    results_by_id = by_id(results)
    assert results_by_id["deep"].outcome == pb.OUTCOME_OK
    assert not results_by_id["deep"].HasField("json")  # too deep to decode: the body is there
    assert results_by_id["deep"].body == body
    for dependent in ("use", "each"):
        assert results_by_id[dependent].outcome == pb.OUTCOME_ERROR
        assert results_by_id[dependent].error == "dependency 'deep' answered JSON nested too deeply"
    assert rest.recorder.requests == []
    assert "internal error" not in caplog.text
    assert "Traceback" not in caplog.text


def test_the_new_keys_load_from_a_yaml_file(tmp_path: Path) -> None:
    """allowed_headers and max_path_bytes load from YAML like every other key."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "server: {max_path_bytes: 4096}\n"
        "upstreams:\n"
        "  web: {kind: http, url: 'http://127.0.0.1:1', allowed_headers: [x-forwarded-for]}\n"
    )
    config = load_config(path)
    assert config.server.max_path_bytes == 4096
    assert config.upstreams["web"].allowed_headers == ("x-forwarded-for",)


@pytest.mark.parametrize("method", ["Aggregate", "Collect"])
async def test_a_request_nested_past_protobufs_limit_is_invalid_argument(
    start_server, rest, rpc, method
):
    # JSON nested 60 deep is 120 message levels (Value, ListValue, Value, ...): protobuf refuses
    # to parse it, which grpc itself would answer UNKNOWN "Unexpected <class DecodeError>".
    deep = struct_pb2.Value(string_value="x").SerializeToString()
    for _ in range(60):  # written by hand: protobuf itself refuses to copy a message this deep
        deep = _field(6, _field(1, deep))  # Value.list_value { ListValue.values }
    call_bytes = pb.HttpCall(upstream="rest", method="POST", path="/echo").SerializeToString()
    call_bytes += _field(pb.HttpCall.DESCRIPTOR.fields_by_name["json"].number, deep)
    target = pb.Target(id="deep").SerializeToString()
    target += _field(pb.Target.DESCRIPTOR.fields_by_name["http"].number, call_bytes)
    raw = _field(pb.AggregateRequest.DESCRIPTOR.fields_by_name["targets"].number, target)
    server, _ = await start_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        path = f"/aggregator.v1.Aggregator/{method}"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _call_raw(channel, path, raw, streaming=method == "Aggregate")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid AggregateRequest" in (refused.value.details() or "")
    assert nothing_sent(rest, rpc)


async def _call_raw(channel: grpc.aio.Channel, path: str, raw: bytes, streaming: bool) -> None:
    if streaming:
        async for _ in channel.unary_stream(path)(raw, timeout=5):
            pass
    else:
        await channel.unary_unary(path)(raw, timeout=5)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


async def test_a_forwarded_header_is_not_sent_beside_an_underscore_spelling_of_it(
    start_server, rest
):
    # An upstream reading _ as - would see two x-tenant headers; the target's own one wins.
    _, stub = await start_server(
        web={"kind": "http", "url": rest.url, "forward_headers": ["x-tenant"]}
    )
    target = http("t", "/echo", upstream="web", headers={"x_tenant": "own"})
    results, code, _, _ = await collect(
        stub.Aggregate(
            pb.AggregateRequest(targets=[target]), timeout=5, metadata=(("x-tenant", "fwd"),)
        )
    )
    assert code == grpc.StatusCode.OK
    sent = {name.lower(): value for name, value in json.loads(results[0].body)["headers"].items()}
    assert sent.get("x_tenant") == "own"
    assert "x-tenant" not in sent
