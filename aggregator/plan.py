"""From an AggregateRequest to a Plan: every check happens here, before anything is sent.

``make_plan`` either returns a Plan whose every target is ready to call, or raises
InvalidRequest naming each problem with its target, e.g.::

    target "price": http.path "https://evil.example/x" must be a path starting with "/"
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote

from google.protobuf import json_format, struct_pb2

from aggregator.config import HTTP_METHODS, METADATA_KEY, Config, UpstreamConfig
from aggregator.errors import InvalidRequest
from aggregator.substitution import (
    ITEM,
    Reference,
    Substitution,
    json_strings,
    parse_reference,
    references,
)
from aggregator.v1 import aggregator_pb2 as pb

_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_GRPC_METHOD = re.compile(r"^/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*\Z")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Connection-level headers, and the ones that would let a caller steer the request
# somewhere or frame it differently than the upstream's connection does.
_FORBIDDEN_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
_RESERVED_METADATA = frozenset({"te", "content-type", "user-agent", "host", "x-request-id"})


# The plan's classes are built for every target of every call, so they are slots dataclasses but
# not frozen: a frozen __init__ sets each field through object.__setattr__, which cost a third of
# make_plan (measured in instructions). They are read-only by convention: changed copies are
# made with dataclasses.replace, never by assignment.
@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    json_body: Any = None  # the JSON body as Python values, kept for substitution

    @property
    def idempotent(self) -> bool:
        """Safe to send twice: an idempotent method, or a caller's Idempotency-Key."""
        if self.method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE"):
            return True
        return any(name.lower() == "idempotency-key" for name, _ in self.headers)

    def rendered(self, substitution: Substitution) -> HttpRequest:
        """This request with every {{...}} reference replaced."""
        body = self.body
        if self.json_body is not None:
            body = json.dumps(substitution.json(self.json_body), separators=(",", ":")).encode()
        return replace(
            self,
            path=substitution.path(self.path),
            query=tuple((name, substitution.text(value)) for name, value in self.query),
            headers=tuple((name, substitution.header(value)) for name, value in self.headers),
            body=body,
        )


@dataclass(slots=True)
class GrpcRequest:
    method: str
    request: bytes
    metadata: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class PlannedTarget:
    id: str
    upstream: UpstreamConfig
    request: HttpRequest | GrpcRequest
    required: bool
    timeout: float | None
    depends_on: tuple[str, ...]
    fallback: struct_pb2.Value | None
    decode_json: bool
    # Whether the request holds {{...}} references to render when the target starts.
    templated: bool = False
    for_each: Reference | None = None
    # Set on the targets a for_each expansion makes: which element, and the element itself.
    index: int | None = None
    item: Any = None

    @property
    def sources(self) -> tuple[str, ...]:
        """What references may name: the dependencies, and ``item`` under for_each."""
        return (*self.depends_on, ITEM) if self.for_each else self.depends_on

    @property
    def idempotent(self) -> bool:
        request = self.request
        return isinstance(request, HttpRequest) and request.idempotent


@dataclass(frozen=True, slots=True)
class Plan:
    targets: tuple[PlannedTarget, ...]
    max_targets: int = 100  # results an aggregate may produce, for_each expansions included

    def __repr__(self) -> str:
        return f"<Plan [{len(self.targets)} targets]>"


def make_plan(request: pb.AggregateRequest, config: Config) -> Plan:
    """Validates ``request`` against ``config``; raises InvalidRequest listing every problem."""
    return plain_plan(request, config) or explained_plan(request, config)


def plain_plan(request: pb.AggregateRequest, config: Config) -> Plan | None:
    """The plan of a request whose every target is plain (no references, for_each,
    depends_on, JSON payload or gRPC metadata) and passes every check; else None.

    The hot path: one pass, no generators and no sentences. It accepts only what
    ``explained_plan`` accepts, with the same plan (tests/test_fuzz.py checks both on
    generated requests); anything unusual or wrong goes to ``explained_plan``, which says
    what is wrong.
    """
    targets = request.targets
    limit = config.server.max_targets
    if not 0 < len(targets) <= limit:
        return None
    upstreams = config.upstreams
    seen: set[str] = set()
    planned = []
    for target in targets:
        target_id = target.id
        if target_id in seen or target.depends_on or target.for_each or not _ID.match(target_id):
            return None
        seen.add(target_id)
        kind = target.WhichOneof("call")
        call: pb.HttpCall | pb.GrpcCall
        planned_request: HttpRequest | GrpcRequest | None
        if kind == "http":
            call = target.http
            planned_request = _plain_http(call)
        elif kind == "grpc":
            call = target.grpc
            planned_request = _plain_grpc(call)
        else:
            return None
        upstream = upstreams.get(call.upstream)
        if planned_request is None or upstream is None or upstream.kind != kind:
            return None
        timeout = None
        if target.HasField("timeout"):
            nanos = target.timeout.ToNanoseconds()
            if nanos <= 0:
                return None
            timeout = nanos / 1e9
        fallback = target.fallback if target.HasField("fallback") else None
        # Positional arguments: keywords cost a dataclass __init__ twice as much (measured).
        planned.append(
            PlannedTarget(
                target_id, upstream, planned_request, target.required, timeout, (), fallback,
                target.decode_json,
            )
        )  # fmt: skip
    return Plan(targets=tuple(planned), max_targets=limit)


def _plain_http(call: pb.HttpCall) -> HttpRequest | None:
    method = call.method or "GET"
    path = call.path
    payload = call.WhichOneof("payload")
    if method not in HTTP_METHODS or payload == "json" or not _plain_path(path):
        return None
    query: tuple[tuple[str, str], ...] = ()
    if call.query:
        query = tuple(sorted(call.query.items()))
        if any("{{" in value for _, value in query):
            return None
    headers: tuple[tuple[str, str], ...] = ()
    if call.headers:
        headers = tuple(sorted(call.headers.items()))
        for name, value in headers:
            if (
                "{{" in value
                or not _TOKEN.match(name)
                or name.lower() in _FORBIDDEN_HEADERS
                or _HEADER_CONTROL.search(value)
            ):
                return None
    body = call.body if payload == "body" else None
    return HttpRequest(method, path, query, headers, body)


def _plain_path(path: str) -> bool:
    """A path _path_problems accepts, without references (conservative: may say no)."""
    if not path.startswith("/") or path.startswith("//") or _CONTROL.search(path):
        return False
    if "\\" in path or "?" in path or "#" in path or "{{" in path:
        return False
    return ("." not in path and "%" not in path) or not dot_segments(path)


def dot_segments(path: str) -> bool:
    """Whether ``path``, percent-decoded, has a ``.`` or ``..`` segment."""
    return any(segment in (".", "..") for segment in unquote(path).split("/"))


def _plain_grpc(call: pb.GrpcCall) -> GrpcRequest | None:
    if call.metadata or not _GRPC_METHOD.match(call.method):
        return None
    return GrpcRequest(call.method, call.request, ())


def explained_plan(request: pb.AggregateRequest, config: Config) -> Plan:
    """make_plan for any request: every check, each problem in a sentence."""
    problems: list[str] = []
    limit = config.server.max_targets
    if not request.targets:
        problems.append("targets: at least one target is required")
    elif len(request.targets) > limit:
        problems.append(
            f"targets: {len(request.targets)} targets exceed server.max_targets ({limit})"
        )
    problems.extend(_id_problems(request.targets))
    expanding = {target.id for target in request.targets if target.for_each}
    planned = []
    for index, target in enumerate(request.targets):
        label = f"target {target.id!r}" if target.id else f"targets[{index}]"
        target_problems = list(_target_problems(target, config.upstreams))
        problems.extend(f"{label}: {problem}" for problem in target_problems)
        # Most targets have no {{...}}: look for references only where braces are.
        templated = any("{{" in text for text in _template_texts(target))
        if templated or target.for_each:
            problems.extend(_template_problems(target, expanding))
        if not target_problems:
            planned.append(_plan_target(target, config.upstreams, templated))
    if any(target.depends_on for target in request.targets):
        problems.extend(_dependency_problems(request.targets))
    if problems:
        raise InvalidRequest(problems)
    return Plan(targets=tuple(planned), max_targets=limit)


def _id_problems(targets: Sequence[pb.Target]) -> Iterator[str]:
    seen: set[str] = set()
    for index, target in enumerate(targets):
        if not _ID.match(target.id):
            yield f"targets[{index}].id: {target.id!r} must match [A-Za-z0-9_.-]{{1,64}}"
        elif target.id in seen:
            yield f"targets[{index}].id: {target.id!r} is used by more than one target"
        seen.add(target.id)


def _target_problems(target: pb.Target, upstreams: Mapping[str, UpstreamConfig]) -> Iterator[str]:
    kind = target.WhichOneof("call")
    if kind is None:
        yield "one of http or grpc is required"
        return
    call = target.http if kind == "http" else target.grpc
    upstream = upstreams.get(call.upstream)
    if not call.upstream:
        yield f"{kind}.upstream: required"
    elif upstream is None:
        yield f"{kind}.upstream: {call.upstream!r} is not a configured upstream"
    elif upstream.kind != kind:
        yield f"{kind}.upstream: {call.upstream!r} is a {upstream.kind} upstream, not {kind}"
    if kind == "http":
        yield from _http_problems(target.http)
    else:
        yield from _grpc_problems(target.grpc)
    if target.HasField("timeout") and target.timeout.ToNanoseconds() <= 0:
        yield "timeout: must be longer than 0"


def _http_problems(call: pb.HttpCall) -> Iterator[str]:
    method = call.method or "GET"
    if method not in HTTP_METHODS:
        yield f"http.method: {method!r} is not one of {', '.join(sorted(HTTP_METHODS))}"
    yield from _path_problems(call.path)
    for name, value in call.headers.items():
        if not _TOKEN.match(name):
            yield f"http.headers: {name!r} is not a valid header name"
        elif name.lower() in _FORBIDDEN_HEADERS:
            yield f"http.headers: {name!r} may not be set by callers"
        if _HEADER_CONTROL.search(value):
            yield f"http.headers[{name!r}]: value contains control characters (CR, LF, NUL...)"
    if call.WhichOneof("payload") == "json" and not _finite_json(call.json):
        yield "http.json: NaN and Infinity are not JSON numbers"


def _path_problems(path: str) -> Iterator[str]:
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        yield f'http.path: {path!r} must be a path starting with "/" (no scheme or host)'
    elif _CONTROL.search(path) or "?" in path or "#" in path:
        yield f"http.path: {path!r} contains whitespace, control characters, ? or # (use query)"
    elif dot_segments(path):
        yield f"http.path: {path!r} contains . or .. segments"


def _grpc_problems(call: pb.GrpcCall) -> Iterator[str]:
    if not _GRPC_METHOD.match(call.method):
        yield f"grpc.method: {call.method!r} is not a full method name /package.Service/Method"
    for key, value in call.metadata.items():
        if not METADATA_KEY.match(key) or key.endswith("-bin") or key.startswith("grpc-"):
            yield f"grpc.metadata: {key!r} is not a lowercase ASCII metadata key"
        elif key in _RESERVED_METADATA:
            yield f"grpc.metadata: {key!r} may not be set by callers"
        if any(not " " <= ch <= "~" for ch in value):
            yield f"grpc.metadata[{key!r}]: value must be printable ASCII"


def _dependency_problems(targets: Sequence[pb.Target]) -> Iterator[str]:
    graph = {target.id: list(target.depends_on) for target in targets}
    for target_id, deps in graph.items():
        for dep in deps:
            if dep == target_id:
                yield f"target {target_id!r}: depends_on names itself"
            elif dep not in graph:
                yield f"target {target_id!r}: depends_on names unknown target {dep!r}"
    cycle = _find_cycle(graph)
    if cycle:
        yield f"depends_on: cycle {' -> '.join(i if _ID.match(i) else repr(i) for i in cycle)}"


def _template_problems(target: pb.Target, expanding: set[str]) -> Iterator[str]:
    """References that name no dependency (or a for_each target, whose body is not one)."""
    label = f"target {target.id!r}"
    sources = tuple(target.depends_on)
    if ITEM in sources:  # {{item...}} is for_each's element: a target of that name is unreachable
        yield f"{label}: depends_on names target 'item', but {{{{item}}}} is for_each's element"
    if target.for_each:
        yield from (f"{label}: {p}" for p in _for_each_problems(target.for_each, sources))
        sources = (*sources, ITEM)
    for text in _template_texts(target):
        for raw in references(text):
            reference = parse_reference(raw, sources)
            if reference is None:
                yield (
                    f"{label}: {{{{{raw}}}}} names no target in depends_on"
                    + (" (nor item)" if target.for_each else "")
                )
            elif reference.source in expanding:
                yield f"{label}: {{{{{raw}}}}} names for_each target {reference.source!r}"


def _for_each_problems(text: str, sources: tuple[str, ...]) -> Iterator[str]:
    found = list(references(text))
    reference = parse_reference(found[0], sources) if len(found) == 1 else None
    if reference is None or text.strip() != "{{" + found[0] + "}}":
        yield f"for_each: {text!r} must be one {{{{id.path}}}} naming a target in depends_on"


def _template_texts(target: pb.Target) -> Iterator[str]:
    if target.WhichOneof("call") != "http":
        return
    call = target.http
    yield call.path
    yield from call.query.values()
    yield from call.headers.values()
    if call.WhichOneof("payload") == "json" and _finite_json(call.json):
        yield from json_strings(json_format.MessageToDict(call.json))


def _finite_json(value: struct_pb2.Value) -> bool:
    """Whether ``value`` holds no NaN or Infinity, which JSON cannot carry."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = item.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(item.number_value):
            return False
        if kind == "list_value":
            stack.extend(item.list_value.values)
        elif kind == "struct_value":
            stack.extend(item.struct_value.fields.values())
    return True


def _find_cycle(graph: Mapping[str, list[str]]) -> list[str]:
    """Returns one cycle (first id repeated at the end), or [] when there is none.
    Iterative: a chain of thousands of targets must not exhaust the stack."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = fully explored
    for root in graph:
        if root in state:
            continue
        path: list[str] = [root]
        state[root] = 1
        pending = [iter(graph[root])]
        while pending:
            node = path[-1]
            dep = next(
                (d for d in pending[-1] if d != node and d in graph and state.get(d) != 2), None
            )
            if dep is None:
                state[node] = 2
                path.pop()
                pending.pop()
            elif state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            else:
                state[dep] = 1
                path.append(dep)
                pending.append(iter(graph[dep]))
    return []


def _plan_target(
    target: pb.Target, upstreams: Mapping[str, UpstreamConfig], templated: bool
) -> PlannedTarget:
    request: HttpRequest | GrpcRequest
    if target.WhichOneof("call") == "http":
        call = target.http
        request = HttpRequest(
            method=call.method or "GET",
            path=call.path,
            query=tuple(sorted(call.query.items())) if call.query else (),
            headers=_http_headers(call),
            body=_http_body(call),
            json_body=_json_body(call),
        )
    else:
        request = GrpcRequest(
            method=target.grpc.method,
            request=target.grpc.request,
            metadata=tuple(sorted(target.grpc.metadata.items())) if target.grpc.metadata else (),
        )
    upstream_name = target.http.upstream if target.HasField("http") else target.grpc.upstream
    for_each = None
    found = list(references(target.for_each)) if target.for_each else []
    if found:  # a bad for_each is reported by _template_problems; the plan is then dropped
        for_each = parse_reference(found[0], tuple(target.depends_on))
    return PlannedTarget(
        id=target.id,
        upstream=upstreams[upstream_name],
        request=request,
        required=target.required,
        timeout=target.timeout.ToNanoseconds() / 1e9 if target.HasField("timeout") else None,
        depends_on=tuple(target.depends_on),
        fallback=target.fallback if target.HasField("fallback") else None,
        decode_json=target.decode_json,
        templated=templated,
        for_each=for_each,
    )


def _http_headers(call: pb.HttpCall) -> tuple[tuple[str, str], ...]:
    headers = sorted(call.headers.items())
    if call.WhichOneof("payload") == "json" and not any(
        name.lower() == "content-type" for name, _ in headers
    ):
        headers.append(("Content-Type", "application/json"))
    return tuple(headers)


def _json_body(call: pb.HttpCall) -> Any:
    return json_format.MessageToDict(call.json) if call.WhichOneof("payload") == "json" else None


def _http_body(call: pb.HttpCall) -> bytes | None:
    payload = call.WhichOneof("payload")
    if payload == "body":
        return call.body
    if payload == "json":
        return json_format.MessageToJson(call.json, indent=None).encode()
    return None
