"""make_plan: every malformed request of docs/api.md is refused, naming each problem and its
target."""

from __future__ import annotations

import itertools
import json
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2

from aggregator.config import config_from_mapping
from aggregator.errors import InvalidRequest
from aggregator.plan import Plan, PlannedTarget, make_plan
from aggregator.request import GrpcRequest, HttpRequest
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import http

MAX_TARGETS = 8
CONFIG = config_from_mapping(
    {
        "server": {"max_targets": MAX_TARGETS},
        "upstreams": {
            "rest": {"kind": "http", "url": "http://127.0.0.1:8081"},
            "rpc": {"kind": "grpc", "address": "127.0.0.1:50061"},
        },
    }
)


def grpc_call(
    target_id: str,
    method: str = "/test.Upstream/Echo",
    upstream: str = "rpc",
    request: bytes = b"",
    metadata: dict[str, str] | None = None,
    **fields: Any,
) -> pb.Target:
    call = pb.GrpcCall(upstream=upstream, method=method, request=request, metadata=metadata)
    return pb.Target(id=target_id, grpc=call, **fields)


def plan(*targets: pb.Target) -> Plan:
    return make_plan(pb.AggregateRequest(targets=targets), CONFIG)


def plan_one(target: pb.Target) -> PlannedTarget:
    (planned,) = plan(target).targets
    return planned


def refuse(*targets: pb.Target) -> list[str]:
    """The problems make_plan reports for a request of ``targets`` (it must refuse it)."""
    with pytest.raises(InvalidRequest) as raised:
        plan(*targets)
    return raised.value.problems


def refuse_one(target: pb.Target) -> str:
    """The single problem reported for a request of one bad ``target``; it names the target."""
    problems = refuse(target)
    assert len(problems) == 1, problems
    assert repr(target.id) in problems[0]
    return problems[0]


def json_value(raw: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if isinstance(raw, dict):
        value.struct_value.update(raw)
    else:
        value.list_value.extend(raw)
    return value


# Batch and ids ----------------------------------------------------------------------------------


def test_empty_batch_is_refused():
    problems = refuse()
    assert len(problems) == 1
    assert problems[0].startswith("targets:")
    assert "at least one" in problems[0]


def test_more_than_max_targets_is_refused_naming_the_limit():
    targets = [http(f"t{i}", "/x") for i in range(MAX_TARGETS + 1)]
    problems = refuse(*targets)
    assert len(problems) == 1
    assert "server.max_targets" in problems[0]
    assert f"{MAX_TARGETS + 1} targets" in problems[0]
    assert f"({MAX_TARGETS})" in problems[0]


def test_exactly_max_targets_is_accepted():
    targets = [http(f"t{i}", "/x") for i in range(MAX_TARGETS)]
    assert [t.id for t in plan(*targets).targets] == [f"t{i}" for i in range(MAX_TARGETS)]


BAD_IDS = {
    "empty": "",
    "65-chars": "x" * 65,
    "space": "has space",
    "slash": "a/b",
    "newline": "a\nb",
    "trailing-newline": "price\n",
    "for-each-style": "price[0]",
    "braces": "{{id}}",
    "non-ascii": "é",
    "colon": "a:b",
    "comma": "a,b",
}


@pytest.mark.parametrize("bad_id", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_bad_id_is_refused_naming_its_position_and_value(bad_id):
    problems = refuse(http("fine", "/x"), http(bad_id, "/x"))
    assert len(problems) == 1
    assert problems[0].startswith("targets[1].id:")
    if bad_id:  # the value is not quoted back (issue 23 #7): the field and the rule are
        assert repr(bad_id) not in problems[0]


@pytest.mark.parametrize("good_id", ["a", "x" * 64, "A-z_0.9", "...", "-"])
def test_ids_matching_the_pattern_are_accepted(good_id):
    assert plan_one(http(good_id, "/x")).id == good_id


def test_duplicate_ids_are_refused_once_per_repeat():
    problems = refuse(http("dup", "/a"), http("other", "/b"), http("dup", "/c"), grpc_call("dup"))
    assert len(problems) == 2
    assert problems[0].startswith("targets[2].id:")
    assert problems[1].startswith("targets[3].id:")
    assert all("'dup'" in p and "more than one" in p for p in problems)


# The call and its upstream ------------------------------------------------------------------


def test_target_without_a_call_is_refused():
    problem = refuse_one(pb.Target(id="nocall"))
    assert "one of http or grpc" in problem


@pytest.mark.parametrize(
    ("target", "field", "words"),
    [
        (http("unknown-http", "/x", upstream="nope"), "http.upstream", "no configured upstream"),
        (grpc_call("unknown-grpc", upstream="nope"), "grpc.upstream", "no configured upstream"),
        (http("http-to-grpc", "/x", upstream="rpc"), "http.upstream", "names a grpc upstream"),
        (grpc_call("grpc-to-http", upstream="rest"), "grpc.upstream", "names a http upstream"),
        (http("missing-http", "/x", upstream=""), "http.upstream", "required"),
        (grpc_call("missing-grpc", upstream=""), "grpc.upstream", "required"),
        # Never a raw host: an address is not the name of a configured upstream.
        (
            http("raw-host", "/x", upstream="127.0.0.1:8081"),
            "http.upstream",
            "no configured upstream",
        ),
    ],
    ids=lambda v: v.id if isinstance(v, pb.Target) else None,
)
def test_upstream_must_be_configured_and_of_the_calls_kind(target, field, words):
    problem = refuse_one(target)
    assert f"{field}:" in problem
    assert words in problem


# HTTP calls ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method", ["get", "TRACE", "CONNECT", "FOO", "GET ", " GET", "G\r\nET", "POST\x00"]
)
def test_bad_http_method_is_refused(method):
    problem = refuse_one(http("verb", "/x", method=method))
    assert "http.method:" in problem
    assert repr(method) not in problem


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_standard_http_methods_are_accepted(method):
    planned = plan_one(http("verb", "/x", method=method))
    assert isinstance(planned.request, HttpRequest)
    assert planned.request.method == method


NOT_PATHS = {
    "empty": "",
    "relative": "users/1",
    "relative-dot": "./x",
    "absolute-url": "http://evil/x",
    "https-url": "https://evil.example/x",
    "scheme-only": "javascript:alert(1)",
    "protocol-relative": "//evil/x",
    "protocol-relative-bare": "//evil.example",
    "backslash-host": "/\\evil.example/x",
    "backslashes": "\\\\evil\\x",
    "backslash-inside": "/a\\b",
    "query": "/x?q=1",
    "bare-query": "/?",
    "fragment": "/x#f",
    "crlf": "/a\r\nHost: evil",
    "lf": "/a\nb",
    "cr": "/a\rb",
    "space": "/a b",
    "tab": "/a\tb",
    "nul": "/a\x00",
    "escape": "/a\x1b[0m",
    "del": "/a\x7f",
    "dot": "/.",
    "dot-inside": "/a/./b",
    "dotdot": "/..",
    "dotdot-inside": "/a/../b",
    "dotdot-trailing": "/a/..",
    "encoded-dotdot": "/%2e%2e/admin",
    "encoded-dotdot-upper": "/a/%2E%2E/b",
    "half-encoded-dotdot": "/a/.%2e/b",
    "encoded-dot": "/%2e/x",
}


@pytest.mark.parametrize("path", NOT_PATHS.values(), ids=NOT_PATHS.keys())
def test_path_that_is_not_a_path_is_refused(path):
    problem = refuse_one(http("page", path))
    assert "http.path:" in problem
    assert repr(path) not in problem  # values stay private (issue 23 #7)


@pytest.mark.parametrize(
    "path",
    ["/", "/users/42", "/a/b/", "/a..b", "/.well-known/x", "/a/.x", "/items%20x", "/a/b.c/d"],
)
def test_paths_are_accepted_unchanged(path):
    planned = plan_one(http("page", path))
    assert isinstance(planned.request, HttpRequest)
    assert planned.request.path == path


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "host",
        "HOST",
        "Connection",
        "Keep-Alive",
        "Transfer-Encoding",
        "Content-Length",
        "TE",
        "Trailer",
        "Upgrade",
        "Proxy-Authorization",
        "Proxy-Connection",
        "Expect",
    ],
)
def test_forbidden_header_is_refused(name):
    problem = refuse_one(http("hdr", "/x", headers={name: "v"}))
    assert "http.headers" in problem
    assert repr(name) in problem


@pytest.mark.parametrize(
    "value",
    ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b", "\r\n"],
    ids=["crlf", "lf", "cr", "nul", "only-crlf"],
)
def test_header_value_with_cr_lf_or_nul_is_refused(value):
    problem = refuse_one(http("hdr", "/x", headers={"X-Tenant": value}))
    assert "http.headers['X-Tenant']" in problem


@pytest.mark.parametrize(
    "name",
    ["", "Bad Header", "X:Y", "X\r\nY", "X-Tenant\n", "X-Ünicode", "(x)", "a/b", "a=b", "x\x00"],
)
def test_bad_header_name_is_refused(name):
    problem = refuse_one(http("hdr", "/x", headers={name: "v"}))
    assert "http.headers" in problem
    assert repr(name) in problem


# gRPC calls ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    [
        "",
        "Echo",
        "test.Upstream/Echo",
        "/test.Upstream",
        "/test.Upstream/",
        "//Echo",
        "/test.Upstream/Echo/extra",
        "/test Upstream/Echo",
        "/test.Upstream/Ec-ho",
        "/1pkg.Service/Method",
        "http://h/test.Upstream/Echo",
        "/test.Upstream/Echo\n",
    ],
)
def test_bad_grpc_method_name_is_refused(method):
    problem = refuse_one(grpc_call("rpc-call", method=method))
    assert "grpc.method:" in problem
    if method:
        assert repr(method) not in problem


@pytest.mark.parametrize("method", ["/test.Upstream/Echo", "/Service/Method", "/a.b.c.S_1/M_2"])
def test_full_grpc_method_names_are_accepted(method):
    planned = plan_one(grpc_call("rpc-call", method=method))
    assert isinstance(planned.request, GrpcRequest)
    assert planned.request.method == method


@pytest.mark.parametrize(
    "key",
    [
        "X-Tenant",
        "x-Tenant",
        "data-bin",
        "grpc-timeout",
        "grpc-status",
        ":authority",
        "has space",
        "",
        "x\n",
        "té",
        # Reserved: set by grpc or by the aggregator itself.
        "te",
        "content-type",
        "user-agent",
        "host",
        "x-request-id",
    ],
)
def test_bad_or_reserved_metadata_key_is_refused(key):
    problem = refuse_one(grpc_call("meta", metadata={key: "v"}))
    assert "grpc.metadata" in problem
    assert repr(key) in problem


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "\x00", "\x7f", "tab\there", "é", "\u2028"])
def test_non_printable_metadata_value_is_refused(value):
    problem = refuse_one(grpc_call("meta", metadata={"x-tenant": value}))
    assert "grpc.metadata['x-tenant']" in problem
    assert "printable" in problem


def test_printable_metadata_is_accepted_sorted():
    planned = plan_one(
        grpc_call("meta", metadata={"x-b": "two words ~!", "x-a": "", "a.b_c-1": "1"})
    )
    assert isinstance(planned.request, GrpcRequest)
    assert planned.request.metadata == (("a.b_c-1", "1"), ("x-a", ""), ("x-b", "two words ~!"))


# Timeouts and for_each ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "timeout",
    [
        duration_pb2.Duration(),
        duration_pb2.Duration(seconds=-1),
        duration_pb2.Duration(nanos=-1),
    ],
    ids=["zero", "minus-1s", "minus-1ns"],
)
@pytest.mark.parametrize(
    "make", [lambda **f: http("slow", "/x", **f), lambda **f: grpc_call("slow", **f)]
)
def test_non_positive_timeout_is_refused(timeout, make):
    problem = refuse_one(make(timeout=timeout))
    assert "timeout:" in problem


def test_positive_timeout_becomes_seconds():
    assert plan_one(http("t", "/x", timeout=duration_pb2.Duration(nanos=1))).timeout == 1e-9
    assert plan_one(http("t", "/x", timeout=duration_pb2.Duration(seconds=2))).timeout == 2.0
    assert plan_one(http("t", "/x")).timeout is None


@pytest.mark.parametrize(
    "for_each",
    ["{{ghost.items}}", "list.items", "{{list.items}} and more", "{{list.a}}{{list.b}}"],
)
def test_for_each_must_be_one_reference_to_a_dependency(for_each):
    problems = refuse(
        http("list", "/items"),
        http("each", "/items/{{item}}", depends_on=["list"], for_each=for_each),
    )
    assert len(problems) == 1
    assert "'each'" in problems[0]
    assert "for_each:" in problems[0]


def test_item_is_only_known_under_for_each():
    problems = refuse(http("list", "/items"), http("each", "/items/{{item}}", depends_on=["list"]))
    assert problems == ["target 'each': {{item}} names no target in depends_on"]


def test_references_to_a_for_each_target_are_refused():
    problems = refuse(
        http("list", "/items"),
        http("each", "/x/{{item}}", depends_on=["list"], for_each="{{list.items}}"),
        http("after", "/y/{{each.id}}", depends_on=["each"]),
    )
    assert problems == ["target 'after': {{each.id}} names for_each target 'each'"]


def test_references_in_query_headers_and_json_are_checked():
    problems = refuse(
        http(
            "a",
            "/x",
            method="POST",
            query={"q": "{{ghost.q}}"},
            headers={"X-H": "{{ghost.h}}"},
            json=json_value({"k": ["{{ghost.j}}"]}),
        )
    )
    assert sorted(problems) == [
        "target 'a': {{ghost.h}} names no target in depends_on",
        "target 'a': {{ghost.j}} names no target in depends_on",
        "target 'a': {{ghost.q}} names no target in depends_on",
    ]


def test_longest_dependency_id_wins_when_ids_contain_dots():
    planned = plan(
        http("user", "/u"),
        http("user.v2", "/u2"),
        http("orders", "/o/{{user.v2.id}}", depends_on=["user", "user.v2"]),
    ).targets[2]
    assert planned.templated
    assert planned.depends_on == ("user", "user.v2")


# depends_on ---------------------------------------------------------------------------------


def test_depends_on_unknown_id_is_refused_naming_both():
    problems = refuse(http("a", "/x"), http("b", "/x", depends_on=["a", "ghost"]))
    assert len(problems) == 1
    assert "'b'" in problems[0]
    assert "'ghost'" in problems[0]
    assert "depends_on" in problems[0]


def test_depends_on_itself_is_refused():
    problems = refuse(http("a", "/x"), http("narcissus", "/x", depends_on=["narcissus"]))
    assert len(problems) == 1
    assert "'narcissus'" in problems[0]
    assert "itself" in problems[0]


def cycle_in(problems: list[str]) -> list[str]:
    """The ids named by the one problem that reports a cycle, in the order it names them."""
    (cycle,) = [p for p in problems if "cycle" in p]
    return cycle.split("cycle", 1)[1].replace("->", " ").split()


def test_two_target_cycle_is_refused_naming_both_ids():
    problems = refuse(http("a", "/x", depends_on=["b"]), http("b", "/x", depends_on=["a"]))
    assert len(problems) == 1
    named = cycle_in(problems)
    assert set(named) == {"a", "b"}
    assert named[0] == named[-1]


def test_longer_cycle_is_refused_naming_exactly_its_ids_in_order():
    problems = refuse(
        http("entry", "/x", depends_on=["first"]),
        http("first", "/x", depends_on=["second"]),
        http("second", "/x", depends_on=["third"]),
        http("third", "/x", depends_on=["first"]),
        http("bystander", "/x"),
    )
    assert len(problems) == 1
    named = cycle_in(problems)
    # A closed walk: first id repeated at the end, each id depending on the next.
    assert named[0] == named[-1]
    assert set(named) == {"first", "second", "third"}
    edges = {"first": "second", "second": "third", "third": "first"}
    assert all(edges[a] == b for a, b in itertools.pairwise(named))


def test_acyclic_dependencies_are_accepted_and_kept():
    planned = plan(
        http("root", "/x"),
        http("left", "/x", depends_on=["root"]),
        http("right", "/x", depends_on=["root"]),
        http("join", "/x", depends_on=["left", "right"]),
    )
    assert {t.id: t.depends_on for t in planned.targets} == {
        "root": (),
        "left": ("root",),
        "right": ("root",),
        "join": ("left", "right"),
    }


# Several problems at once -------------------------------------------------------------------


def test_every_problem_is_reported_each_naming_its_target():
    problems = refuse(
        http("fine", "/ok"),
        http("bad-path", "http://evil/x"),
        http("bad-header", "/x", headers={"Host": "evil"}),
        grpc_call("bad-meta", metadata={"X-Upper": "v"}),
        grpc_call("wrong-kind", upstream="rest"),
        http("bad-timeout", "/x", timeout=duration_pb2.Duration(seconds=-1)),
    )
    named = ["bad-path", "bad-header", "bad-meta", "wrong-kind", "bad-timeout"]
    assert len(problems) == len(named)
    for target_id, problem in zip(named, problems, strict=True):
        assert repr(target_id) in problem
    assert not any("'fine'" in p for p in problems)


def test_every_problem_of_one_target_is_reported():
    problems = refuse(
        http(
            "messy",
            "/../x",
            method="FETCH",
            upstream="nope",
            headers={"Connection": "close"},
            timeout=duration_pb2.Duration(),
        )
    )
    fields = ["http.upstream", "http.method", "http.path", "http.headers", "timeout"]
    assert len(problems) == len(fields)
    assert all(problem.startswith("target 'messy':") for problem in problems)
    assert sorted(problem.split(": ")[1] for problem in problems) == sorted(fields)


def test_batch_id_and_target_problems_are_all_reported():
    targets = [
        http("dup", "/x"),
        http("dup", "/x"),
        http("", "/x"),
        http("c", "x"),
        grpc_call("d", ""),
    ]
    # Too many targets: refused for that alone, before anything else is read (issue 23 #3).
    too_many = refuse(*targets, *(http(f"more{i}", "/x") for i in range(MAX_TARGETS)))
    assert too_many == [
        f"targets: {len(targets) + MAX_TARGETS} targets exceed server.max_targets ({MAX_TARGETS})"
    ]
    problems = refuse(*targets)
    text = "\n".join(problems)
    assert "targets[1].id" in text
    assert "targets[2].id" in text
    assert "target 'c': http.path" in text
    assert "target 'd': grpc.method" in text
    # The target without an id is named by its position.
    assert not any(p.startswith("target ''") for p in problems)


def test_dependency_problems_are_reported_alongside_other_problems():
    problems = refuse(
        http("bad-path", "x"),
        http("waits", "/x", depends_on=["ghost"]),
        http("a", "/x", depends_on=["b"]),
        http("b", "/x", depends_on=["a"]),
    )
    text = "\n".join(problems)
    assert "'bad-path'" in text
    assert "'ghost'" in text
    assert "cycle" in text


def test_invalid_request_is_invalid_argument_with_every_problem_in_its_message():
    with pytest.raises(InvalidRequest) as raised:
        plan(http("one", "x"), grpc_call("two", "nope"))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(raised.value.problems) == 2
    assert all(p in raised.value.message for p in raised.value.problems)


# What a valid request becomes ---------------------------------------------------------------


def test_method_defaults_to_get_without_body():
    request = plan_one(http("plain", "/x")).request
    assert request == HttpRequest(method="GET", path="/x", query=(), headers=(), body=None)


def test_json_body_becomes_application_json_bytes():
    body = json_value({"sku": "A-1", "qty": 2, "tags": ["a", "b"], "gift": None})
    request = plan_one(http("post", "/x", method="POST", json=body)).request
    assert isinstance(request, HttpRequest)
    assert isinstance(request.body, bytes)
    assert json.loads(request.body) == {"sku": "A-1", "qty": 2, "tags": ["a", "b"], "gift": None}
    assert ("Content-Type", "application/json") in request.headers


def test_json_array_body_is_json_too():
    request = plan_one(http("post", "/x", method="POST", json=json_value([1, "two"]))).request
    assert isinstance(request, HttpRequest)
    assert request.body is not None
    assert json.loads(request.body) == [1, "two"]


def test_callers_content_type_is_kept_with_a_json_body():
    target = http(
        "post", "/x", method="POST", json=json_value({}), headers={"content-type": "application/x"}
    )
    request = plan_one(target).request
    assert isinstance(request, HttpRequest)
    assert [(n, v) for n, v in request.headers if n.lower() == "content-type"] == [
        ("content-type", "application/x")
    ]


def test_raw_body_passes_through_without_a_content_type():
    payload = bytes(range(256))
    request = plan_one(http("put", "/x", method="PUT", body=payload)).request
    assert isinstance(request, HttpRequest)
    assert request.body == payload
    assert request.headers == ()


def test_query_and_headers_are_kept():
    target = http("q", "/x", query={"b": "2", "a": "1 &"}, headers={"X-B": "2", "X-A": "1"})
    request = plan_one(target).request
    assert isinstance(request, HttpRequest)
    assert request.query == (("a", "1 &"), ("b", "2"))
    assert request.headers == (("X-A", "1"), ("X-B", "2"))


def test_grpc_target_keeps_its_request_bytes_and_upstream():
    planned = plan_one(grpc_call("price", request=b"\x00\x01\xff", metadata={"x-tenant": "t1"}))
    assert planned.request == GrpcRequest(
        method="/test.Upstream/Echo", request=b"\x00\x01\xff", metadata=(("x-tenant", "t1"),)
    )
    assert planned.upstream is CONFIG.upstreams["rpc"]


def test_target_options_are_carried_into_the_plan():
    fallback = json_value({"price": 0})
    planned = plan_one(
        http("opt", "/x", required=True, decode_json=True, fallback=fallback, upstream="rest")
    )
    assert planned.upstream is CONFIG.upstreams["rest"]
    assert planned.required is True
    assert planned.decode_json is True
    assert planned.fallback == fallback
    plain = plan_one(http("plain", "/x"))
    assert (plain.required, plain.decode_json, plain.fallback) == (False, False, None)


def test_plan_keeps_the_request_order():
    ids = ["c", "a", "b"]
    assert [t.id for t in plan(*(http(i, "/x") for i in ids)).targets] == ids
    assert repr(plan(*(http(i, "/x") for i in ids))) == "<Plan [3 targets]>"


@pytest.mark.parametrize(
    ("method", "headers", "idempotent"),
    [
        ("GET", {}, True),
        ("HEAD", {}, True),
        ("OPTIONS", {}, True),
        ("PUT", {}, True),
        ("DELETE", {}, True),
        ("", {}, True),
        ("POST", {}, False),
        ("PATCH", {}, False),
        ("POST", {"Idempotency-Key": "k-1"}, True),
        ("POST", {"idempotency-key": "k-1"}, True),
        ("PATCH", {"IDEMPOTENCY-KEY": "k-1"}, True),
        ("POST", {"X-Idempotency": "k-1"}, False),
    ],
)
def test_idempotent_http_calls(method, headers, idempotent):
    assert plan_one(http("call", "/x", method=method, headers=headers)).idempotent is idempotent


def test_grpc_calls_are_not_idempotent():
    assert plan_one(grpc_call("call", metadata={"idempotency-key": "k-1"})).idempotent is False


# Issue 17: what an upstream could read differently, and what could cost more than linear time --


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", ""])
@pytest.mark.parametrize("payload", ["body", "json"])
def test_a_body_on_a_bodiless_method_is_refused_naming_the_field(method, payload):
    body = (
        {"body": b"GET /admin HTTP/1.1\r\n\r\n"}
        if payload == "body"
        else {"json": json_value({"a": 1})}
    )
    problem = refuse_one(http("smuggler", "/x", method=method, **body))
    assert f"http.{payload}:" in problem
    assert f"a {method or 'GET'} request carries no body" in problem


def test_an_empty_body_on_get_is_no_body():
    planned = plan_one(http("page", "/x", body=b""))
    assert isinstance(planned.request, HttpRequest)
    assert planned.request.body is None


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_methods_with_a_body_keep_it(method):
    planned = plan_one(http("page", "/x", method=method, body=b"payload"))
    assert isinstance(planned.request, HttpRequest)
    assert planned.request.body == b"payload"


BYPASS_PATHS = {
    "semicolon-dotdot": "/public/..;/admin",
    "semicolon-dot": "/public/.;x/admin",
    "encoded-semicolon-dotdot": "/public/..%3B/admin",
    "encoded-backslash": "/public/..%5cadmin",
    "encoded-backslash-upper": "/public%5C..%5Cadmin",
    "double-encoded-dotdot": "/public/%252e%252e/admin",
    "double-encoded-slash-dotdot": "/public%252f..%252fadmin",
    "triple-encoded": "/public/%25252e",
    "encoded-nul": "/public/x%00.json",
    "encoded-crlf": "/public/x%0d%0aSet-Cookie:a",
    "overlong-dot": "/public/%c0%ae%c0%ae/admin",
    "overlong-slash": "/public/..%c0%afadmin",
    "broken-utf8": "/public/%ff",
    "fullwidth-dots": "/public/\uff0e\uff0e/admin",
    "encoded-fullwidth-dots": "/public/%ef%bc%8e%ef%bc%8e/admin",
    "fullwidth-solidus": "/public/..\uff0fadmin",
    "one-dot-leader": "/public/\u2025/admin",
    "fullwidth-percent": "/public/\uff052e\uff052e/admin",
    # Issue 23 #11: a decoded reading cut at ? or #, trailing spaces or dots, %u escapes.
    "encoded-question-dotdot": "/public/..%3F/admin",
    "encoded-hash-dotdot": "/public/..%23/admin",
    "encoded-space-dotdot": "/public/..%20/admin",
    "encoded-nbsp-dotdot": "/public/..%C2%A0/admin",
    "three-dots": "/public/.../admin",
    "u-escape-dot": "/public/%u002e%u002e/admin",
}


@pytest.mark.parametrize("path", BYPASS_PATHS.values(), ids=BYPASS_PATHS.keys())
def test_paths_an_upstream_could_normalize_elsewhere_are_refused(path):
    problem = refuse_one(http("sneaky", path))
    assert "http.path:" in problem


@pytest.mark.parametrize(
    "path",
    ["/a;v=1/b", "/files/a%2Fb", "/x/100%2541", "/caf%C3%A9", "/café", "/a%20b", "/%7Euser"],
)
def test_paths_with_one_reading_are_accepted(path):
    planned = plan_one(http("page", path))
    assert isinstance(planned.request, HttpRequest)
    assert planned.request.path == path


LIMITED = config_from_mapping(
    {
        "server": {"max_path_bytes": 100},
        "upstreams": {
            "rest": {"kind": "http", "url": "http://127.0.0.1:8081"},
            "rpc": {"kind": "grpc", "address": "127.0.0.1:50061"},
        },
    }
)


def refuse_limited(target: pb.Target) -> str:
    with pytest.raises(InvalidRequest) as raised:
        make_plan(pb.AggregateRequest(targets=[target]), LIMITED)
    (problem,) = raised.value.problems
    assert repr(target.id) in problem
    return problem


def test_paths_queries_and_grpc_methods_are_capped_at_max_path_bytes():
    assert make_plan(pb.AggregateRequest(targets=[http("a", "/" + "x" * 99)]), LIMITED)
    problem = refuse_limited(http("long", "/" + "x" * 100))
    assert problem == "target 'long': http.path: 101 bytes exceed server.max_path_bytes (100)"
    problem = refuse_limited(http("wide", "/", query={"q": "é" * 50}))
    assert "http.query: 103 bytes of names and values exceed server.max_path_bytes (100)" in problem
    method = "/test.Upstream/" + "M" * 90
    problem = refuse_limited(grpc_call("rpc-long", method=method))
    assert "grpc.method: 105 bytes exceed server.max_path_bytes (100)" in problem


def test_a_path_over_the_cap_is_not_repeated_in_the_message():
    problem = refuse_limited(http("huge", "/" + "x" * 1_000_000))
    assert len(problem) < 200


@pytest.mark.parametrize(
    "name",
    [
        "X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override", "X-Original-URL",
        "X-Rewrite-URL", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto",
        "X-Forwarded-Client-Cert", "Forwarded", "X-Real-IP", "True-Client-IP",
        "X-Auth-Request-User", "X-Auth-Request-Email", "X-Envoy-Original-Path", "Remote-User",
        "content_length", "Transfer_Encoding", "x_forwarded_for", "X_HTTP_METHOD_OVERRIDE",
        "x_request_id",
    ],
)  # fmt: skip
def test_headers_that_reroute_remethod_or_reidentify_are_refused(name):
    problem = refuse_one(http("hdr", "/x", headers={name: "v"}))
    assert f"http.headers: {name!r}" in problem


def test_names_one_header_to_an_upstream_are_refused_together():
    problem = refuse_one(http("hdr", "/x", headers={"X-Tenant": "a", "x_tenant": "b"}))
    assert "'X-Tenant' and 'x_tenant' are one header" in problem
    problem = refuse_one(http("hdr", "/x", headers={"Accept": "a", "accept": "b"}))
    assert "are one header" in problem


ALLOWING = config_from_mapping(
    {
        "upstreams": {
            "rest": {
                "kind": "http",
                "url": "http://127.0.0.1:8081",
                "allowed_headers": ["X-Forwarded-For", "x-http-method-override"],
            },
            "rpc": {
                "kind": "grpc",
                "address": "127.0.0.1:50061",
                "allowed_headers": ["x-forwarded-for"],
            },
        },
    }
)


def test_allowed_headers_admits_a_refused_header_on_purpose():
    request = pb.AggregateRequest(
        targets=[
            http("h", "/x", headers={"X-Forwarded-For": "10.0.0.1", "X-HTTP-Method-Override": "P"}),
            grpc_call("g", metadata={"x-forwarded-for": "10.0.0.1"}),
        ]
    )
    planned = make_plan(request, ALLOWING)
    assert [t.id for t in planned.targets] == ["h", "g"]
    with pytest.raises(InvalidRequest) as raised:
        make_plan(
            pb.AggregateRequest(targets=[http("h", "/x", headers={"X-Real-IP": "1"})]), ALLOWING
        )
    assert "'X-Real-IP'" in raised.value.problems[0]
    # Only the name as listed: the underscore spelling is another header.
    with pytest.raises(InvalidRequest):
        make_plan(
            pb.AggregateRequest(targets=[http("h", "/x", headers={"x_forwarded_for": "1"})]),
            ALLOWING,
        )


@pytest.mark.parametrize(
    "key",
    ["x-forwarded-for", "x_forwarded_for", "forwarded", "x-forwarded-client-cert", "x-real-ip",
     "x-http-method-override", "connection", "transfer-encoding", "x_request_id"],
)  # fmt: skip
def test_grpc_metadata_that_reidentifies_or_frames_is_refused(key):
    problem = refuse_one(grpc_call("meta", metadata={key: "v"}))
    assert f"grpc.metadata: {key!r}" in problem


@pytest.mark.parametrize(
    "value", ["a\x0bb", "a\x1bb", "a\x7fb", "a\x85b", "a\u2028b", "a\u2029b", "a\x0cb"]
)
def test_header_values_with_any_control_character_are_refused(value):
    problem = refuse_one(http("hdr", "/x", headers={"X-Tenant": value}))
    assert "http.headers['X-Tenant']: value contains control characters" in problem


def test_a_tab_and_non_ascii_text_are_header_values():
    planned = plan_one(http("hdr", "/x", headers={"X-Tenant": "a\tb", "X-Name": "José"}))
    assert isinstance(planned.request, HttpRequest)


def test_depends_on_naming_a_target_twice_is_refused():
    problems = refuse(http("a", "/x"), http("b", "/x", depends_on=["a", "a", "a"]))
    assert problems == ["target 'b': depends_on: names 'a' more than once"]


def test_depends_on_is_capped_per_target():
    config = config_from_mapping(
        {"server": {"max_targets": 100}, "upstreams": {"rest": {"kind": "http", "url": BASE}}}
    )
    deps = [http(f"d{i}", "/x") for i in range(65)]
    fine = http("t", "/x", depends_on=[f"d{i}" for i in range(64)])
    assert make_plan(pb.AggregateRequest(targets=[*deps, fine]), config)
    over = http("t", "/x", depends_on=[f"d{i}" for i in range(65)])
    with pytest.raises(InvalidRequest) as raised:
        make_plan(pb.AggregateRequest(targets=[*deps, over]), config)
    assert raised.value.problems == ["target 't': depends_on: 65 entries exceed 64 per target"]


def test_references_are_capped_per_target():
    fine = http("t", "/" + "/".join(["{{a.x}}"] * 256), depends_on=["a"])
    assert plan(http("a", "/x"), fine)
    over = http("t", "/" + "/".join(["{{a.x}}"] * 257), depends_on=["a"])
    problems = refuse(http("a", "/x"), over)
    assert problems == ["target 't': more than 256 {{...}} references (the limit per target)"]


BASE = "http://127.0.0.1:8081"
