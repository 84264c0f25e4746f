"""Property tests: whatever a caller sends and whatever an operator writes, the answer is a plan or
a clean refusal (InvalidRequest, INVALID_ARGUMENT with trailers, ConfigError) — never a crash.

Examples are bounded so the file runs in seconds; the hypothesis database lives in .hypothesis/
(gitignored), so a failure found once is replayed first next time.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import re
import string
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from google.protobuf import duration_pb2, struct_pb2
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from yarl import URL

from aggregator import config as config_module
from aggregator import plan as plan_module
from aggregator.config import Config, ConfigError, config_from_mapping, load_config, parse_config
from aggregator.errors import InvalidRequest
from aggregator.plan import Plan, make_plan
from aggregator.request import GrpcRequest, HttpRequest, request_allowed, request_problems
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import TRAILER_KEYS, collect

DATABASE = DirectoryBasedExampleDatabase(
    str(Path(__file__).resolve().parents[2] / ".hypothesis" / "examples")
)


# `make test` (and CI) explores the same examples every run, so a red build always reproduces;
# AGGREGATOR_FUZZ=explore draws new ones (and remembers failures in .hypothesis/).
EXPLORE = os.environ.get("AGGREGATOR_FUZZ") == "explore"


def bounded(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples * (10 if EXPLORE else 1),
        deadline=None,
        derandomize=not EXPLORE,
        database=DATABASE if EXPLORE else None,
        # No explain phase: it traces every line, which crawls through deep recursion.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


MAX_TARGETS = 6
BASE_URL = "http://127.0.0.1:8081"
CONFIG = config_from_mapping(
    {
        "server": {"max_targets": MAX_TARGETS},
        "upstreams": {
            "rest": {"kind": "http", "url": BASE_URL},
            "rpc": {"kind": "grpc", "address": "127.0.0.1:50061"},
        },
    }
)
HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
FORBIDDEN_HEADERS = {"connection", "host", "transfer-encoding", "content-length", "upgrade", "te"}


def one_line(problem: str) -> bool:
    """Non-empty and a single line by every definition Python knows (\\r, \\x85, \\u2028...)."""
    return bool(problem.strip()) and problem.splitlines() == [problem]


# Building blocks: strings that hurt ---------------------------------------------------------------

NASTY_TEXT = [
    "", " ", "\x00", "\r\n", "\n", "\r", "\t", "\x0b", "\x1c", "\x7f", "\x85", "\u2028",
    "\u202e", "\ufeff", "é", "中文", "🙂", "{{", "}}", "{{a}}", "{{a.b.0}}", "{{item}}",
    "{{ a }}", "%00", "%0d%0a", "%2e%2e", "..", ".", "\\", ":", "x" * 65, "a\nb",
]  # fmt: skip


def texts(max_size: int = 12, huge: int = 40_000) -> st.SearchStrategy[str]:
    """Any unicode (no surrogates: protobuf strings cannot hold them), the nasty classics,
    and now and then a huge one."""
    return st.one_of(
        st.text(max_size=max_size),
        st.sampled_from(NASTY_TEXT),
        st.text(alphabet=string.printable, max_size=max_size),
        st.builds(
            lambda unit, n: unit * n,
            st.sampled_from(["x", "é", "/", "a\n", "{{a}}", "\x00"]),
            st.integers(1_000, huge),
        ),
    )


VALID_IDS = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
NASTY_PATHS = [
    "", "/", "//", "//evil.example/x", "http://evil.example/x", "https:/x", "/a/../b",
    "/%2e%2e/admin", "/%2E./x", "/a/./b", "/..", "/a\r\nHost: evil", "\\\\evil\\x", "/a\\b",
    "/a?b=c", "/a#frag", "/ a", "/a\tb", "/\x00", "/\x85", "/\u2028", "/é/中", "/@evil.example",
    "/:80", "/{{a.b}}", "/x/{{item}}", "/{{a}}/{{b.c}}", "/%2F%2Fevil.example", " /x", "x",
    "/echo", "/status/404", "/delay/1", "/text",
]  # fmt: skip
PATHS = st.one_of(
    texts(),
    texts().map(lambda tail: "/" + tail),
    st.sampled_from(NASTY_PATHS),
)
HTTP_METHODS = st.one_of(
    st.sampled_from(["", "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    st.sampled_from(["get", "BREW", "CONNECT", "TRACE", "GET ", "G\x00T"]),
    texts(),
)
NASTY_HEADER_NAMES = [
    "Host", "Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "TE", "Upgrade",
    "Expect", "Proxy-Authorization", "Idempotency-Key", "Content-Type", "X-Request-Id",
    "x-request-id", "bad name", "", "X-é", "X:Y", "X-A\r\n",
]  # fmt: skip
HEADER_NAMES = st.one_of(
    st.from_regex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}", fullmatch=True),
    st.sampled_from(NASTY_HEADER_NAMES),
    texts(),
)
NASTY_METADATA_KEYS = [
    "x-request-id", "te", "content-type", "user-agent", "host", "grpc-timeout", "grpc-status",
    "a-bin", "Upper", "", ":path", "connection", "authorization",
]  # fmt: skip
METADATA_KEYS = st.one_of(
    st.from_regex(r"[0-9a-z_.-]{1,16}", fullmatch=True),
    st.sampled_from(NASTY_METADATA_KEYS),
    texts(),
)
NASTY_GRPC_METHODS = [
    "/test.Upstream/Echo", "/test.Upstream/Fail", "Echo", "", "/", "//x", "/a/b/c",
    "/test.Upstream/Echo\n", "/a.B/", "test.Upstream/Echo",
]  # fmt: skip
GRPC_METHODS = st.one_of(
    st.from_regex(r"/[A-Za-z_][A-Za-z0-9_.]{0,10}/[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
    st.sampled_from(NASTY_GRPC_METHODS),
    texts(),
)
UPSTREAMS = st.one_of(st.sampled_from(["rest", "rpc", "dead", "", "nowhere", "REST"]), texts())
FOR_EACH = st.one_of(
    st.just(""),
    st.sampled_from(["{{a.items}}", "{{item}}", "{{a}}", "{{a}} {{b}}", "x{{a.items}}", "{{"]),
    texts(),
)
DURATIONS = st.builds(
    duration_pb2.Duration,
    seconds=st.one_of(st.integers(-3, 3), st.integers(-(2**62), 2**62)),
    nanos=st.integers(-999_999_999, 999_999_999),
)


def _list_value(values: list[struct_pb2.Value]) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.list_value.values.extend(values)
    return value


def _struct_value(fields: dict[str, struct_pb2.Value]) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.SetInParent()
    for key, field in fields.items():
        value.struct_value.fields[key].CopyFrom(field)
    return value


# Kept shallow: protobuf's own decoder refuses nesting past 100 levels, on either side.
JSON_VALUES = st.recursive(
    st.one_of(
        st.just(struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)),
        st.floats().map(lambda number: struct_pb2.Value(number_value=number)),
        texts(huge=5_000).map(lambda text: struct_pb2.Value(string_value=text)),
        st.booleans().map(lambda flag: struct_pb2.Value(bool_value=flag)),
        st.just(struct_pb2.Value()),  # no kind set at all
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(_list_value),
        st.dictionaries(texts(), children, max_size=3).map(_struct_value),
    ),
    max_leaves=6,
)


@st.composite
def targets(draw: st.DrawFn, ids: st.SearchStrategy[str]) -> pb.Target:
    target = pb.Target(id=draw(ids))
    kind = draw(st.sampled_from(["http", "grpc", "none"]))
    if kind == "http":
        call = target.http
        call.SetInParent()
        call.upstream = draw(UPSTREAMS)
        call.method = draw(HTTP_METHODS)
        call.path = draw(PATHS)
        call.query.update(draw(st.dictionaries(texts(), texts(), max_size=3)))
        call.headers.update(draw(st.dictionaries(HEADER_NAMES, texts(), max_size=3)))
        payload = draw(st.sampled_from(["none", "body", "json"]))
        if payload == "body":
            call.body = draw(st.binary(max_size=64))
        elif payload == "json":
            call.json.CopyFrom(draw(JSON_VALUES))
    elif kind == "grpc":
        call_grpc = target.grpc
        call_grpc.SetInParent()
        call_grpc.upstream = draw(UPSTREAMS)
        call_grpc.method = draw(GRPC_METHODS)
        call_grpc.request = draw(st.binary(max_size=16))
        call_grpc.metadata.update(draw(st.dictionaries(METADATA_KEYS, texts(), max_size=3)))
    target.required = draw(st.booleans())
    if draw(st.booleans()):
        target.timeout.CopyFrom(draw(DURATIONS))
    target.depends_on.extend(draw(st.lists(ids, max_size=3)))
    if draw(st.booleans()):
        target.fallback.CopyFrom(draw(JSON_VALUES))
    target.decode_json = draw(st.booleans())
    target.for_each = draw(FOR_EACH)
    return target


@st.composite
def requests(draw: st.DrawFn, max_size: int = MAX_TARGETS + 2) -> pb.AggregateRequest:
    """Batches whose ids come partly from a small shared pool, so duplicates, depends_on that
    name real targets, and cycles are common rather than astronomically rare."""
    pool = draw(st.lists(st.one_of(VALID_IDS, texts()), min_size=1, max_size=4))
    ids = st.one_of(st.sampled_from(pool), VALID_IDS, texts())
    return pb.AggregateRequest(targets=draw(st.lists(targets(ids), max_size=max_size)))


def _request(*targets: pb.Target) -> pb.AggregateRequest:
    return pb.AggregateRequest(targets=list(targets))


def _http(target_id: str, path: str = "/x", **fields: Any) -> pb.Target:
    payload = {key: fields.pop(key) for key in ("json", "headers") if key in fields}
    return pb.Target(
        id=target_id, http=pb.HttpCall(upstream="rest", path=path, **payload), **fields
    )


# Known-bad inputs, replayed every run whatever the random draw.
NAN_JSON_BODY = _request(_http("a", json=struct_pb2.Value(number_value=math.nan)))
INFINITE_JSON_BODY = _request(_http("a", json=struct_pb2.Value(number_value=math.inf)))
CYCLE_THROUGH_A_NEWLINE_ID = _request(
    _http("a\nb", depends_on=["c"]), _http("c", depends_on=["a\nb"])
)
CONTROL_CHARACTER_HEADER = _request(_http("a", "/echo", headers={"X-A": "1\x012"}))
HUGE_BAD_PATH = _request(_http("a", "x" * 30_000))
# Far over max_targets, yet the dependency check still walks all of it.
DEEP_CHAIN = _request(
    *(_http(f"t{i}", depends_on=[f"t{i + 1}"] if i < 4_999 else []) for i in range(5_000))
)


# (a) make_plan ----------------------------------------------------------------------------------


def plan_or_problems(request: pb.AggregateRequest, config: Config) -> tuple[Plan | None, list[str]]:
    """make_plan's answer: (plan, []) or (None, problems). Anything else it raises propagates."""
    try:
        return make_plan(request, config), []
    except InvalidRequest as refused:
        problems = refused.problems
    assert problems, "a refusal names at least one problem"
    return None, problems


def check_plan(request: pb.AggregateRequest) -> None:
    plan, problems = plan_or_problems(request, CONFIG)
    for problem in problems:
        assert isinstance(problem, str)
        assert one_line(problem), f"problem is not one non-empty line: {problem!r}"
    if plan is None:
        return
    assert [target.id for target in plan.targets] == [target.id for target in request.targets]
    for planned in plan.targets:
        if not isinstance(planned.request, HttpRequest):
            continue
        path = planned.request.path
        assert path.startswith("/"), path
        assert not path.startswith("//"), path
        assert not {"\r", "\n"} & set(path), path
        parts = urlsplit(path)
        assert (parts.scheme, parts.netloc) == ("", ""), path
        assert URL(BASE_URL + path).host == "127.0.0.1", path
        for name, value in planned.request.headers:
            assert name.lower() not in FORBIDDEN_HEADERS, name
            # RFC 9110 field values: no control characters but HTAB (HTTP clients refuse them).
            assert not HEADER_CONTROL.search(value), (name, value)


@bounded(200)
@given(request=requests())
@example(request=NAN_JSON_BODY)
@example(request=INFINITE_JSON_BODY)
@example(request=CYCLE_THROUGH_A_NEWLINE_ID)
@example(request=HUGE_BAD_PATH)
@example(request=CONTROL_CHARACTER_HEADER)
@example(request=DEEP_CHAIN)
def test_make_plan_returns_a_plan_or_refuses_with_one_line_per_problem(request):
    check_plan(request)


# The fast path and the explained one walk one table: they agree by construction -----------------
# (request.py's Rules: all_hold is the conjunction of the predicates broken asks one by one).

RULED = config_from_mapping(
    {
        "server": {"max_targets": MAX_TARGETS},
        "upstreams": {
            "rest": {
                "kind": "http",
                "url": BASE_URL,
                "allowed_methods": ["GET", "POST"],
                "path_prefixes": ["/echo", "/status/"],
                "max_headers": 2,
                "max_header_bytes": 40,
                "max_request_bytes": 32,
            },
            "rpc": {
                "kind": "grpc",
                "address": "127.0.0.1:50061",
                "allowed_methods": ["/test.Upstream/*"],
                "max_request_bytes": 8,
            },
        },
    }
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` fifteen times in sixteen: each target has several fields, and one bad one
    is enough to leave the fast path."""
    return st.integers(0, 15).flatmap(lambda roll: bad if roll == 0 else good)


PLAIN_PATHS = mostly(
    st.one_of(
        st.from_regex(r"/[a-z0-9/.%-]{0,12}", fullmatch=True),
        st.sampled_from(["/echo", "/echo/a.json", "/status/200", "/v1/x%20y", "/echo/.x"]),
    ),
    st.one_of(st.sampled_from(NASTY_PATHS), st.from_regex(r"/[a-z?#{}\\ ]{0,6}", fullmatch=True)),
)
PLAIN_VALUES = mostly(
    st.from_regex(r"[a-z0-9 /._-]{0,8}", fullmatch=True),
    st.one_of(st.sampled_from(["{{a.b}}", "x\r\ny", "\t", "é", "\x00"]), texts()),
)
PLAIN_HEADER_NAMES = mostly(
    st.sampled_from(["Accept", "X-Tenant", "Authorization", "Idempotency-Key"]), HEADER_NAMES
)
PLAIN_IDS = mostly(VALID_IDS, st.one_of(st.sampled_from(["a", "b", ""]), texts()))


@st.composite
def plain_looking_targets(draw: st.DrawFn, ids: st.SearchStrategy[str]) -> pb.Target:
    """Targets near the fast path's edge: mostly valid, with one thing wrong now and then."""
    target = pb.Target(id=draw(ids), required=draw(st.booleans()))
    target.decode_json = draw(st.booleans())
    if draw(st.integers(0, 4)) == 0:
        target.grpc.upstream = draw(mostly(st.just("rpc"), UPSTREAMS))
        target.grpc.method = draw(mostly(st.just("/test.Upstream/Echo"), GRPC_METHODS))
        target.grpc.request = draw(st.binary(max_size=12))
        if draw(st.integers(0, 4)) == 0:
            target.grpc.metadata.update(draw(st.dictionaries(METADATA_KEYS, texts(), max_size=2)))
    else:
        call = target.http
        call.upstream = draw(mostly(st.just("rest"), UPSTREAMS))
        call.method = draw(mostly(st.sampled_from(["", "GET", "POST", "PUT"]), HTTP_METHODS))
        call.path = draw(PLAIN_PATHS)
        call.query.update(draw(st.dictionaries(st.text(max_size=3), PLAIN_VALUES, max_size=2)))
        call.headers.update(draw(st.dictionaries(PLAIN_HEADER_NAMES, PLAIN_VALUES, max_size=2)))
        payload = draw(st.sampled_from(["none", "none", "body", "json"]))
        if payload == "body":
            call.body = draw(st.binary(max_size=40))
        elif payload == "json":
            call.json.CopyFrom(draw(JSON_VALUES))
    if draw(st.integers(0, 3)) == 0:
        target.timeout.CopyFrom(draw(DURATIONS))
    if draw(st.integers(0, 3)) == 0:
        target.fallback.CopyFrom(draw(JSON_VALUES))
    if draw(st.integers(0, 7)) == 0:
        target.depends_on.extend(draw(st.lists(ids, max_size=2)))
    if draw(st.integers(0, 7)) == 0:
        target.for_each = draw(FOR_EACH)
    return target


@st.composite
def plain_looking_requests(draw: st.DrawFn) -> pb.AggregateRequest:
    return pb.AggregateRequest(targets=draw(st.lists(plain_looking_targets(PLAIN_IDS), max_size=4)))


def _rpc(target_id: str, method: str = "/test.Upstream/Echo", **fields: Any) -> pb.Target:
    metadata = fields.pop("metadata", {})
    call = pb.GrpcCall(upstream=fields.pop("upstream", "rpc"), method=method, metadata=metadata)
    return pb.Target(id=target_id, grpc=call, **fields)


# One request per check of the fast paths, each refused (or declined) for that one reason.
NEAR_MISSES = [
    *(_request(_http("a", "/echo"), _http("b", path)) for path in NASTY_PATHS),
    *(_request(_http("a", "/echo", headers={name: "1"})) for name in NASTY_HEADER_NAMES),
    *(_request(_http("a", "/echo", headers={"X-A": v})) for v in ("a\r\nb", "\x00", "{{a}}")),
    _request(pb.Target(id="a", http=pb.HttpCall(upstream="rest", path="/e", query={"q": "{{a}}"}))),
    _request(_http("a", "/echo", headers={"X-A": "y" * 50})),
    _request(_http("a", "/echo", headers={"X-A": "1", "X-B": "2", "X-C": "3"})),
    _request(_http("a", "/echo"), _http("a", "/echo")),
    _request(_http("", "/echo")),
    _request(_http("a b", "/echo")),
    _request(pb.Target(id="a", http=pb.HttpCall(upstream="rest", path="/echo", method="BREW"))),
    _request(pb.Target(id="a", http=pb.HttpCall(upstream="rpc", path="/echo"))),
    _request(pb.Target(id="a", http=pb.HttpCall(upstream="nowhere", path="/echo"))),
    _request(pb.Target(id="a", http=pb.HttpCall(upstream="", path="/echo"))),
    _request(pb.Target(id="a", http=pb.HttpCall(upstream="rest", path="/echo", body=b"x" * 40))),
    _request(_http("a", "/echo", timeout=duration_pb2.Duration(seconds=0))),
    _request(_http("a", "/echo", timeout=duration_pb2.Duration(seconds=-1))),
    _request(_http("a", "/echo", json=struct_pb2.Value(string_value="x"))),
    _request(_http("a", "/echo", depends_on=["b"]), _http("b", "/echo")),
    _request(_http("a", "/echo", for_each="{{b.items}}")),
    _request(pb.Target(id="a")),
    _request(_rpc("a")),
    _request(_rpc("a", "Echo")),
    _request(_rpc("a", "/other.S/M")),
    _request(_rpc("a", upstream="rest")),
    _request(_rpc("a", metadata={"x-a": "1"})),
    _request(*(_http(f"t{i}", "/echo") for i in range(MAX_TARGETS + 1))),
    pb.AggregateRequest(),
]


@pytest.mark.timeout(900 if EXPLORE else 60)
@bounded(400)
@given(request=plain_looking_requests(), config=st.sampled_from([CONFIG, RULED]))
def test_the_fast_path_accepts_exactly_what_the_full_walk_accepts(request, config):
    _check_tables_agree(request, config)


@pytest.mark.parametrize("config", [CONFIG, RULED], ids=["no rules", "rules"])
@pytest.mark.parametrize("request_", NEAR_MISSES)
def test_the_fast_path_agrees_on_each_near_miss(request_, config):
    _check_tables_agree(request_, config)


def _check_tables_agree(request: pb.AggregateRequest, config: Any) -> None:
    """Each target's request, as the planner makes it, is allowed exactly when the whole walk
    finds no problem."""
    limit = config.server.max_path_bytes
    for target in request.targets:
        kind = target.WhichOneof("call")
        upstream = config.upstreams.get(getattr(target, kind).upstream) if kind else None
        if upstream is None or upstream.kind != kind:
            continue
        outbound: HttpRequest | GrpcRequest
        if kind == "http":
            call = target.http
            outbound = HttpRequest(
                call.method or "GET", call.path, tuple(sorted(call.query.items())),
                tuple(sorted(call.headers.items())), call.body or None,
            )  # fmt: skip
        else:
            call = target.grpc
            outbound = GrpcRequest(call.method, call.request, tuple(sorted(call.metadata.items())))
        allowed = request_allowed(upstream, outbound, limit)
        assert allowed == (list(request_problems(upstream, outbound, target.id, limit)) == [])


# A request of ids, upstreams and paths only is read without its other fields ---------------------
# (written.heads: proven by the request's size). A field more, any field, and it is read whole;
# read whole every time (written.bare replaced by written.read), the answer must be the same.

BARE_EXTRAS: list[Callable[[pb.Target], None]] = [
    lambda t: setattr(t, "required", True),
    lambda t: setattr(t, "decode_json", True),
    lambda t: setattr(t, "for_each", "{{a.items}}"),
    lambda t: t.depends_on.append("a"),
    lambda t: t.timeout.SetInParent(),  # present, zero: two bytes
    lambda t: t.fallback.SetInParent(),
    lambda t: setattr(t.http, "method", "POST"),
    lambda t: setattr(t.http, "body", b""),  # set in the oneof, empty: two bytes
    lambda t: t.http.json.SetInParent(),
    lambda t: t.http.query.update({"q": ""}),
    lambda t: t.http.headers.update({"X-A": "1"}),
    lambda t: t.grpc.SetInParent(),  # the call is gRPC now: as many bytes as an empty http
    lambda t: t.ClearField("http"),
]


@st.composite
def bare_requests(draw: st.DrawFn) -> pb.AggregateRequest:
    """Targets of an id, an upstream and a path, one field more now and then."""
    request = pb.AggregateRequest()
    for _ in range(draw(st.integers(1, 4))):
        target = request.targets.add(id=draw(PLAIN_IDS))
        target.http.upstream = draw(mostly(st.sampled_from(["rest", "rpc"]), UPSTREAMS))
        target.http.path = draw(mostly(PLAIN_PATHS, PATHS))
        if draw(st.integers(0, 3)) == 0:
            draw(st.sampled_from(BARE_EXTRAS))(target)
    return request


def _check_read_alike(request: pb.AggregateRequest, config: Config) -> None:
    with mock.patch.object(plan_module, "bare", plan_module.read):
        whole = plan_or_problems(request, config)
    assert plan_or_problems(request, config) == whole


@bounded(300)
@given(request=st.one_of(bare_requests(), plain_looking_requests()))
@example(request=_request(pb.Target(id="a", grpc=pb.GrpcCall())))
@example(request=_request(pb.Target(id="a", required=True), _http("b")))
@example(request=_request(_http("a", "/" + "é" * 70), _http("b" * 64, "/" + "x" * 200)))
def test_a_request_read_bare_is_planned_as_read_whole(request):
    _check_read_alike(request, RULED)


@pytest.mark.parametrize("extra", range(len(BARE_EXTRAS)))
def test_any_field_more_than_id_upstream_and_path_is_read(extra):
    request = _request(_http("a", "/echo"), _http("b", "/echo"))
    BARE_EXTRAS[extra](request.targets[1])
    _check_read_alike(request, CONFIG)
    _check_read_alike(request, RULED)


def dependency_targets(size: int, shape: str, seed: int) -> list[pb.Target]:
    """``size`` targets t0..t{size-1} whose depends_on form ``shape``."""
    rng = random.Random(seed)
    edges: dict[int, list[int]] = {i: [] for i in range(size)}
    for i in range(size):
        if shape in ("chain", "cycle") and i + 1 < size:
            edges[i].append(i + 1)
        elif shape == "fan-in" and i:
            edges[i].append(0)
        elif shape == "random":
            edges[i].extend(rng.sample(range(size), k=min(size, rng.randint(0, 3))))
    if shape == "cycle":
        edges[size - 1].append(0)
    return [_http(f"t{i}", depends_on=[f"t{j}" for j in edges[i]]) for i in range(size)]


def _has_cycle(targets: list[pb.Target]) -> bool:
    """Iterative Kahn's algorithm over edges between distinct targets."""
    deps = {t.id: {d for d in t.depends_on if d != t.id} for t in targets}
    users: dict[str, set[str]] = {t: set() for t in deps}
    for target_id, needed in deps.items():
        for dep in needed:
            users[dep].add(target_id)
    ready = [t for t, needed in deps.items() if not needed]
    left = {t: len(needed) for t, needed in deps.items()}
    done = 0
    while ready:
        node = ready.pop()
        done += 1
        for user in users[node]:
            left[user] -= 1
            if left[user] == 0:
                ready.append(user)
    return done < len(deps)


BIG_CONFIG = dataclasses.replace(
    CONFIG, server=dataclasses.replace(CONFIG.server, max_targets=5_000)
)


@bounded(25)
@given(
    size=st.integers(1, 5_000),
    shape=st.sampled_from(["chain", "cycle", "fan-in", "random"]),
    seed=st.integers(0, 2**32),
)
@example(size=5_000, shape="chain", seed=0)
@example(size=5_000, shape="cycle", seed=0)
def test_dependency_graphs_of_any_shape_and_size_are_planned_or_refused(size, shape, seed):
    batch = dependency_targets(size, shape, seed)
    expect_refusal = _has_cycle(batch) or any(t.id in t.depends_on for t in batch)
    plan, problems = plan_or_problems(_request(*batch), BIG_CONFIG)
    assert all(one_line(problem) for problem in problems)
    assert (plan is None) == expect_refusal, problems[:3]
    if plan is not None:
        assert len(plan.targets) == size


# (b) the same through the real server ----------------------------------------------------------

_request_numbers = itertools.count()


@pytest.fixture
async def fuzzed(start_server):
    """One server for all of a test's examples; ids of the calls it refused, to check that
    none of them ever reaches an upstream, then or later."""
    server, stub = await start_server(server={"max_targets": MAX_TARGETS})
    return server.config, stub, set()


def _seen_request_ids(rest, rpc) -> set[str]:
    seen = {r["headers"].get("x-request-id", "") for r in rest.recorder.requests}
    return seen | {r["metadata"].get("x-request-id", "") for r in rpc.recorder.requests}


def _required_failure_explains(
    request: pb.AggregateRequest, results: list[pb.TargetResult], details: str
) -> bool:
    """A non-OK status that follows a required target's failure, as docs/api.md says."""
    failed = {r.id for r in results if r.outcome != pb.OUTCOME_OK}
    return any(
        details.startswith(f"required target {target.id!r} failed")
        for target in request.targets
        if target.required and target.id in failed
    )


def check_results(request: pb.AggregateRequest, results: list[pb.TargetResult]) -> None:
    """One result per target (for_each targets may report as id[0], id[1], ... instead)."""
    counts = Counter(result.id for result in results)
    assert all(count == 1 for count in counts.values()), counts
    request_ids = {t.id for t in request.targets}
    expanding = {t.id for t in request.targets if t.for_each}
    for target_id in request_ids - expanding:
        assert counts[target_id] == 1, (target_id, counts)
    for result_id in counts:
        assert result_id in request_ids or result_id.split("[", 1)[0] in expanding, result_id
    assert not [r.id for r in results if r.error == "internal error"], "a bug answered a target"


@bounded(60)
@given(request=requests())
@example(request=NAN_JSON_BODY)
@example(request=HUGE_BAD_PATH)
@example(request=CONTROL_CHARACTER_HEADER)
@example(request=DEEP_CHAIN)
async def test_any_request_through_the_server_is_ok_or_a_clean_invalid_argument(
    fuzzed, rest, rpc, request
):
    assume(request.ByteSize() < 3_000_000)  # grpc's own 4 MB message limit is not ours to fuzz
    config, stub, refused_ids = fuzzed
    try:
        make_plan(request, config)
        refused = False
    except InvalidRequest:
        refused = True
    except Exception:  # make_plan itself crashes: (a) reports it; here the server must not
        refused = True
    request_id = f"fuzz-{next(_request_numbers)}"
    call = stub.Aggregate(request, timeout=3, metadata=(("x-request-id", request_id),))
    results, code, details, trailers = await collect(call)

    explained = _required_failure_explains(request, results, details)
    crashed = code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and not explained
    assert not crashed, (code, details[:300])
    assert set(trailers) >= TRAILER_KEYS, (code, details[:300])
    if refused:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details[:300])
    if code == grpc.StatusCode.INVALID_ARGUMENT and not explained:
        # Refused by the plan, or by the server's own checks after it: either way, nothing ran.
        refused_ids.add(request_id)
        assert results == []
        assert trailers["x-aggregate-succeeded"] == "0"
    elif code == grpc.StatusCode.OK:
        check_results(request, results)
        succeeded = sum(r.outcome == pb.OUTCOME_OK for r in results)
        assert trailers["x-aggregate-succeeded"] == str(succeeded)
    else:
        assert explained, (code, details[:300])
    leaked = _seen_request_ids(rest, rpc) & refused_ids
    assert not leaked, f"refused calls reached an upstream: {sorted(leaked)}"


# (c) configuration --------------------------------------------------------------------------

SECTIONS = {
    "server": config_module.ServerConfig,
    "upstream": config_module.UpstreamConfig,
    "retry": config_module.RetryPolicy,
    "hedge": config_module.HedgePolicy,
    "circuit_breaker": config_module.BreakerPolicy,
    "rate_limit": config_module.RateLimit,
    "cache": config_module.CachePolicy,
}
POLICIES = ("retry", "hedge", "circuit_breaker", "rate_limit", "cache")
FIELDS = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
KNOWN_KEYS = sorted({"server", "upstreams", *itertools.chain(*FIELDS.values())})

DURATION_TEXT = st.builds(
    lambda space, number, unit: f"{space}{number}{unit}",
    st.sampled_from(["", " "]),
    st.one_of(
        st.integers(0, 10**6),
        st.integers(0, 10**400),
        st.floats(0, 1e6, allow_nan=False),
        st.integers(-100, -1),
    ),
    st.sampled_from(["ms", "s", "m", "h", "", "sec", " s", "S", "us", "d"]),
)
HOST_PORT = st.builds(
    lambda host, port: f"{host}:{port}",
    st.one_of(st.sampled_from(["127.0.0.1", "[::1]", "[::]", "localhost", ""]), texts()),
    st.one_of(st.integers(-1, 70_000), st.sampled_from(["", "²", "١٢٣", "http", "9" * 30])),
)
URLS = st.one_of(
    st.builds(
        lambda scheme, host, port, tail: f"{scheme}{host}{port}{tail}",
        st.sampled_from(["http://", "https://", "ftp://", "", "http:/", "HTTP://"]),
        st.one_of(st.sampled_from(["127.0.0.1", "[::1]", "[::1", "user:pw@h", "h\n"]), texts()),
        st.one_of(st.just(""), st.integers(-1, 70_000).map(lambda p: f":{p}")),
        st.sampled_from(["", "/", "/base/", "?q=1", "#f", "/a b"]),
    ),
    texts(),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70_000),
    st.integers(-(2**80), 2**80),
    st.floats(),
    texts(huge=5_000),
    DURATION_TEXT,
    HOST_PORT,
    URLS,
    st.dates(),
    st.binary(max_size=8),
)
KEYS = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    texts(max_size=8),
    st.integers(-3, 3),
    st.none(),
    st.booleans(),
)
YAMLISH = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(KEYS, children, max_size=4)
    ),
    max_leaves=12,
)
_VALUE_FOR = {
    "kind": st.sampled_from(["http", "grpc", "HTTP", "tcp", ""]),
    "url": URLS,
    "address": HOST_PORT,
    "metrics_address": st.one_of(st.just(""), HOST_PORT),
    "admin_address": st.one_of(st.just(""), HOST_PORT),
    "log_format": st.sampled_from(["text", "json", "xml"]),
    "log_level": st.sampled_from(["debug", "info", "warning", "error", "trace"]),
    "backend": st.sampled_from(["memory", "redis", "disk"]),
    "redis_url": st.sampled_from(["redis://127.0.0.1:6379/0", "rediss://h", "http://h", ""]),
    "grpc_codes": st.lists(
        st.one_of(st.sampled_from([c.name for c in grpc.StatusCode]), texts()), max_size=3
    ),
}
_DURATION_KEYS = {
    "default_deadline", "max_deadline", "deadline_margin", "shutdown_grace", "timeout",
    "connect_timeout", "backoff", "max_backoff", "delay", "reset_timeout", "ttl",
    "stale_if_error",
}  # fmt: skip


def value_for(key: str) -> st.SearchStrategy[Any]:
    """Mostly plausible values for ``key`` (so valid configs happen too), sometimes anything."""
    if key in _VALUE_FOR:
        plausible = _VALUE_FOR[key]
    elif key in _DURATION_KEYS:
        plausible = DURATION_TEXT
    else:
        plausible = st.one_of(st.integers(-2, 10**6), st.floats(-1, 2e6))
    return st.one_of(plausible, plausible, SCALARS, YAMLISH)


def section(name: str) -> st.SearchStrategy[Any]:
    optional = {key: value_for(key) for key in FIELDS[name] if key not in SECTIONS}
    if name == "upstream":
        optional.pop("name")
        optional.update({policy: section(policy) for policy in POLICIES})
        optional["kind"] = value_for("kind")
    shaped = st.fixed_dictionaries({}, optional=optional)
    return st.one_of(shaped, shaped, shaped, YAMLISH)


UPSTREAM_NAMES = st.one_of(VALID_IDS, KEYS)
CONFIG_SHAPED = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "server": section("server"),
            "upstreams": st.one_of(
                st.dictionaries(UPSTREAM_NAMES, section("upstream"), max_size=3), YAMLISH
            ),
        },
    ),
    YAMLISH,
)


def config_or_problems(load: Callable[[], Config]) -> tuple[Config | None, list[str]]:
    """(config, []) or (None, problems); anything but ConfigError propagates."""
    try:
        return load(), []
    except ConfigError as refused:
        problems, message = refused.problems, str(refused)
    assert message == "\n".join(problems)
    return None, problems


def key_path_prefixes(raw: Any) -> tuple[str, ...]:
    """How a problem may start: a known section, or an unknown top-level key as written or
    quoted (a key holding a line break must be quoted to stay on one line)."""
    top = [str(key) for key in raw] if isinstance(raw, dict) else []
    return ("(top level)", "server", "upstreams", *top, *(repr(key) for key in top))


def assert_names_key_paths(problems: list[str], prefixes: tuple[str, ...]) -> None:
    assert problems
    for problem in problems:
        assert one_line(problem), f"problem is not one non-empty line: {problem!r}"
        assert any(problem.startswith((f"{p}:", f"{p}.")) for p in prefixes), problem


def assert_sane(config: Config) -> None:
    """A config that was accepted holds finite, positive-where-it-must numbers."""
    server = config.server
    for seconds in (server.default_deadline, server.max_deadline, server.shutdown_grace):
        assert math.isfinite(seconds), server
    assert 0 < server.default_deadline <= server.max_deadline
    for upstream in config.upstreams.values():
        for seconds in (upstream.timeout, upstream.connect_timeout):
            assert math.isfinite(seconds), upstream
            assert seconds > 0, upstream
        assert upstream.kind in ("http", "grpc")
        assert not any(ch.isspace() or ord(ch) < 0x20 for ch in upstream.url), upstream


INFINITE_DEADLINE = {
    "server": {"default_deadline": "9" * 400 + "s", "max_deadline": "9" * 400 + "s"}
}
NEWLINE_KEY = {"server": {"log\nlevel": "info"}}
NEWLINE_UPSTREAM = {"upstreams": {"cat\nalog": {"kind": "http", "url": "http://127.0.0.1:1"}}}
NEWLINE_IN_URL = {"upstreams": {"catalog": {"kind": "http", "url": "http://127.0.0.1\n:1"}}}


@bounded(400)
@given(raw=CONFIG_SHAPED)
@example(raw=NEWLINE_KEY)
@example(raw=NEWLINE_UPSTREAM)
@example(raw=INFINITE_DEADLINE)
@example(raw=NEWLINE_IN_URL)
def test_config_from_mapping_only_refuses_with_key_paths(raw):
    config, problems = config_or_problems(lambda: config_from_mapping(raw))
    if config is None:
        assert_names_key_paths(problems, key_path_prefixes(raw))
    else:
        assert_sane(config)


YAML_SCALAR_TOKENS = [
    "2001-02-30", "2001-13-01", "2024-02-29", "2001-02-03 04:05:06", "!!int x", "!!float x",
    "!!timestamp x", "!!binary '@'", "!!bool maybe", "1:30", "0x1F", "0o17", "0b101", "~",
    ".inf", "-.inf", ".nan", "&a [*a]", "*undefined", "!!set {a}", "!!omap [a: 1]",
    "!!python/object:os.system x", "'unterminated", "{a: 1", "[", "1" * 5_000, "250ms",
    "'10 sec'", "http://127.0.0.1:1", "127.0.0.1:1", "[::1]:0", "null", "yes", "\t", "|\n x",
]  # fmt: skip


@st.composite
def yaml_documents(draw: st.DrawFn) -> str:
    """YAML text: dumped data, arbitrary text, lines of key: token, or deep nesting."""
    kind = draw(st.sampled_from(["dumped", "text", "lines", "nested"]))
    if kind == "dumped":
        return yaml.safe_dump(draw(CONFIG_SHAPED), allow_unicode=draw(st.booleans()))
    if kind == "text":
        return draw(st.one_of(st.text(max_size=200), texts()))
    if kind == "lines":
        lines = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(["", "  ", "    "]),
                    st.sampled_from([*KNOWN_KEYS, "catalog"]),
                    st.one_of(st.sampled_from(YAML_SCALAR_TOKENS), st.just(""), texts()),
                ),
                max_size=8,
            )
        )
        return "\n".join(f"{indent}{key}: {token}" for indent, key, token in lines)
    depth = draw(st.integers(1, 3_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ("- ", "")]))
    if opener == "- ":
        return "\n".join("  " * level + "-" for level in range(min(depth, 400))) + " x"
    return opener * depth + closer * depth


@bounded(150)
@given(text=yaml_documents())
@example(text="server: {shutdown_grace: 2001-02-30}")
@example(text="server: {workers: !!int x}")
@example(text="server: {workers: " + "1" * 5_000 + "}")
@example(text="[" * 3_000 + "]" * 3_000)
def test_parse_config_only_refuses_with_one_line_per_problem(text):
    config, problems = config_or_problems(lambda: parse_config(text, source="fuzz.yaml"))
    if config is not None:
        assert_sane(config)
    elif problems[0].startswith("fuzz.yaml: "):  # not YAML at all: the source is named
        assert_names_key_paths(problems, ("fuzz.yaml",))
    else:
        assert_names_key_paths(problems, key_path_prefixes(yaml.safe_load(text)))


@bounded(40)
@given(content=st.one_of(st.binary(max_size=200), yaml_documents().map(str.encode)))
@example(content=b"server: {workers: 1}\n\xff\xfe")
def test_load_config_of_any_bytes_only_refuses(content):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "config.yaml"
        path.write_bytes(content)
        _, problems = config_or_problems(lambda: load_config(path))
    assert all(one_line(problem) for problem in problems), problems
