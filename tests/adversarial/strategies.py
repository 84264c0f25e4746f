"""Hostile AggregateRequests (docs/security.md, "The adversarial harness").

Each surface a caller controls is one strategy of targets; ``hostile_requests`` mixes them.
Sizes stay where today's server answers within the harness's bounds: the known findings' sizes
are in test_known_findings.py, and test_growth.py doubles sizes. A new feature that reads
something from a request adds its surface here (a strategy of targets) and to SURFACES.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from google.protobuf import struct_pb2
from hypothesis import strategies as st

from aggregator.v1 import aggregator_pb2 as pb
from tests.adversarial.conftest import PUBLIC
from tests.conftest import http

MAX_TARGETS = 100  # the adversary's server.max_targets (the default)

# Readings of ".." and "/" an upstream might make, and what they hide behind.
ODD_SEGMENTS = [
    "%2e%2e",
    "%2E%2e",
    "%252e%252e",
    "%u002e%u002e",
    "%c0%ae%c0%ae",
    "\uff0e\uff0e",
    "%EF%BC%8E%EF%BC%8E",
    "..;",
    "..%3b",
    "..\\",
    "..%5c",
    "..%3F",
    "..%23",
    "..%20",
    "..%C2%A0",
    "...",
    "%00",
    "\uff0f..",
    "..%252F",
]

NAME_CHARS = st.characters(codec="utf-8", exclude_categories=["Cs"])


def long_text(max_size: int) -> st.SearchStrategy[str]:
    """Short odd text, or a long repetition of it (long names, ids, methods, values)."""
    piece = st.text(NAME_CHARS, min_size=1, max_size=8)
    return st.one_of(
        piece,
        st.builds(lambda text, n: (text * n)[:max_size], piece, st.integers(1, max_size)),
    )


def ids(index: int) -> st.SearchStrategy[str]:
    """Mostly a plain unique id (a bad one refuses the whole request before anything else is
    reached); sometimes a long, odd or repeated one."""
    odd = st.one_of(st.just("t0"), long_text(2000), st.just("x" * 65))
    return st.integers(0, 7).flatmap(lambda roll: odd if roll == 0 else st.just(f"t{index}"))


def json_values(max_leaves: int = 64) -> st.SearchStrategy[Any]:
    """Deep and wide JSON: nested lists and objects, wide flat ones, odd keys and strings."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**60), 2**60),
        st.floats(allow_nan=False, allow_infinity=False),
        long_text(200),
        st.just("{{item}}"),
    )
    nested = st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=6), st.dictionaries(long_text(20), inner, max_size=6)
        ),
        max_leaves=max_leaves,
    )
    # As deep as a request may carry it (protobuf refuses a copy nested past 100 messages;
    # deeper requests are tests/test_security_validation.py's, written byte by byte).
    deep = st.integers(1, 28).map(_deep)
    wide = st.integers(1, 2000).map(lambda width: {f"k{i}": [i, {}] for i in range(width)})
    return st.one_of(nested, deep, wide)


def _deep(depth: int) -> Any:
    value: Any = "bottom"
    for level in range(depth):
        value = [value] if level % 2 else {"d": value}
    return value


def as_value(document: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.update({"v": document})
    return value.struct_value.fields["v"]


@st.composite
def odd_paths(draw: st.DrawFn) -> tuple[str, str]:
    """(upstream, path): odd encodings under the ruled upstream's prefix, or long paths."""
    segment = draw(st.sampled_from(ODD_SEGMENTS))
    repeat = draw(st.integers(1, 3000))
    return draw(
        st.sampled_from(
            [
                ("ruled", f"{PUBLIC}{segment}/admin"),
                ("ruled", PUBLIC + "/".join([segment] * repeat)),
                ("rest", "/echo/" + quote(segment, safe="%") * repeat),
                ("rest", "/echo/" + "p" * repeat * 4),
            ]
        )
    )


@st.composite
def path_targets(draw: st.DrawFn, index: int) -> list[pb.Target]:
    upstream, path = draw(odd_paths())
    method = draw(st.one_of(st.sampled_from(["GET", "POST", "DELETE"]), long_text(3000)))
    return [http(draw(ids(index)), path, upstream=upstream, method=method)]


@st.composite
def header_targets(draw: st.DrawFn, index: int) -> list[pb.Target]:
    """Many headers (past max_headers), long names and values; or as many gRPC metadata."""
    count = draw(st.integers(0, 200))  # max_headers is 64
    value = draw(long_text(1000))
    if draw(st.booleans()):
        headers = {f"X-H{i}": value for i in range(count)}
        return [http(draw(ids(index)), "/echo/h", headers=headers)]
    metadata = {f"x-m{i}": value for i in range(count)}
    method = draw(st.one_of(st.just("Echo"), long_text(3000)))
    call = pb.GrpcCall(upstream="rpc", method=f"/test.Upstream/{method}", metadata=metadata)
    return [pb.Target(id=draw(ids(index)), grpc=call)]


@st.composite
def json_targets(draw: st.DrawFn, index: int) -> list[pb.Target]:
    """Deep and wide JSON bodies, as http.json or a typed gRPC request's Struct."""
    document = draw(json_values())
    if draw(st.booleans()):
        body = as_value(document)
        return [http(draw(ids(index)), "/echo/j", method="POST", json=body)]
    call = pb.GrpcCall(upstream="shop", method="/shop.v1.Catalog/Echo")
    attributes = call.json.struct_value.fields["attributes"]
    attributes.struct_value.fields["v"].CopyFrom(as_value(document))
    call.json.struct_value.fields["sku"].string_value = "A-1"
    return [pb.Target(id=draw(ids(index)), grpc=call)]


@st.composite
def substitution_targets(draw: st.DrawFn, index: int) -> list[pb.Target]:
    """A dependency answering a value, read many times by a fan-in of dependents, in every
    field a reference may stand in."""
    root = f"d{index}"
    value = draw(st.one_of(long_text(600), st.sampled_from(ODD_SEGMENTS)))  # a query carries it
    answered = json.dumps({"s": value, "n": [1, 2, 3]})
    dependency = http(root, "/json", query={"body": answered})
    copies = draw(st.integers(1, 270))  # the cap is 256 references
    reference = draw(st.sampled_from([f"{{{{{root}.s}}}}", f"{{{{ {root}.n.1 }}}}"]))
    template = reference * copies
    fan_in = draw(st.integers(1, 8))
    repeats = draw(st.integers(1, 70))  # duplicate depends_on entries, the cap is 64
    where = draw(st.sampled_from(["path", "query", "header", "json"]))
    return [dependency] + [
        _referring(f"u{index}x{i}", where, template, [root] * repeats) for i in range(fan_in)
    ]


def _referring(target_id: str, where: str, template: str, depends_on: list[str]) -> pb.Target:
    if where == "path":
        return http(target_id, "/echo/" + template, depends_on=depends_on)
    if where == "query":
        return http(target_id, "/echo/q", query={"q": template}, depends_on=depends_on)
    if where == "header":
        return http(target_id, "/echo/h", headers={"X-S": template}, depends_on=depends_on)
    body = as_value({"s": template, "list": [template] * 3})
    return http(target_id, "/echo/j", method="POST", json=body, depends_on=depends_on)


@st.composite
def for_each_targets(draw: st.DrawFn, index: int) -> list[pb.Target]:
    """for_each over a dependency's array: past max_targets, or elements that are odd paths."""
    root = f"e{index}"
    count = draw(st.integers(0, 150))
    element = draw(st.one_of(st.integers(), st.sampled_from(ODD_SEGMENTS), long_text(40)))
    answered = json.dumps({"items": [element] * count})
    dependency = http(root, "/json", query={"body": answered})
    path = draw(st.sampled_from(["/echo/{{item}}", PUBLIC + "{{item}}"]))
    upstream = "ruled" if path.startswith(PUBLIC) else "rest"
    each = http(
        f"each{index}", path, upstream=upstream, depends_on=[root], for_each=f"{{{{{root}.items}}}}"
    )
    return [dependency, each]


@st.composite
def many_plain_targets(draw: st.DrawFn, index: int) -> list[pb.Target]:
    """Around and beyond server.max_targets."""
    count = draw(st.sampled_from([MAX_TARGETS - 1, MAX_TARGETS, MAX_TARGETS + 1, 1000]))
    return [http(f"p{index}x{i}", "/echo/p") for i in range(count)]


Surface = Callable[[int], st.SearchStrategy[list[pb.Target]]]
SURFACES: list[Surface] = [
    path_targets,
    header_targets,
    json_targets,
    substitution_targets,
    for_each_targets,
    many_plain_targets,
]


@st.composite
def hostile_requests(draw: st.DrawFn) -> pb.AggregateRequest:
    """One to four surfaces' targets in one request."""
    surfaces = draw(st.lists(st.sampled_from(SURFACES), min_size=1, max_size=4))
    targets: list[pb.Target] = []
    for index, surface in enumerate(surfaces):
        targets.extend(draw(surface(index)))
    return pb.AggregateRequest(targets=targets)
