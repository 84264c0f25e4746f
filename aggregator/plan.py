"""From an AggregateRequest to a Plan: every check happens here, before anything is sent.

``make_plan`` either returns a Plan whose every target is ready to call, or raises
InvalidRequest naming each problem with its target, e.g.::

    target "price": http.path "https://evil.example/x" must be a path starting with "/"

Every check costs time linear in the size of the request, and what can multiply is capped per
target: ``MAX_DEPENDS_ON`` entries in ``depends_on`` (each named once) and ``MAX_REFERENCES``
``{{...}}`` references; paths, queries and gRPC method names are capped at
``server.max_path_bytes``. server.py asks whether the caller may call the upstreams a request
names before it plans, so an unauthorized caller costs one pass over the upstream names.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf import json_format, struct_pb2

from aggregator.config import Config, UpstreamConfig
from aggregator.errors import InvalidRequest
from aggregator.schema import MethodSchema
from aggregator.security.fields import (
    canonical_header,
    duplicate_names,
    header_name_problem,
    header_value_problem,
    path_problem,
    steering,
)
from aggregator.substitution import (
    Reference,
    Sources,
    Substitution,
    json_strings,
    references,
)
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import (
    BODILESS_METHODS,
    CONTROL_OR_SPACE,
    FRAMING_HEADERS,
    GRPC_METHOD,
    HTTP_METHODS,
    IDEMPOTENT_METHODS,
    ITEM,
    METADATA_KEY,
    NAME,
    TOKEN,
    UNFORWARDABLE,
)

# Caps per target, so no part of planning or running a target grows with the product of two
# parts of the request (references x sources, entries x entries).
MAX_DEPENDS_ON = 64
MAX_REFERENCES = 256


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
        if self.method in IDEMPOTENT_METHODS:
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
    # GrpcCall.json as Python values (None: request bytes), encoded once the method's
    # schema is known (aggregator/grpc_json.py); json_size is GrpcCall.json's size in bytes.
    json_body: Any = None
    json_size: int = 0
    schema: MethodSchema | None = None
    unavailable: str = ""  # why the upstream's descriptors could not be had, when needed

    def rendered(self, substitution: Substitution) -> GrpcRequest:
        """This request with every {{...}} reference in its JSON and metadata replaced."""
        return replace(
            self,
            json_body=substitution.json(self.json_body) if self.json_body is not None else None,
            metadata=tuple((key, substitution.metadata(value)) for key, value in self.metadata),
        )


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
    max_path_bytes: int = 8 * 1024  # server.max_path_bytes, for requests rendered later

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
    max_path_bytes = config.server.max_path_bytes
    seen: set[str] = set()
    planned = []
    for target in targets:
        target_id = target.id
        if target_id in seen or target.depends_on or target.for_each or not NAME.match(target_id):
            return None
        seen.add(target_id)
        kind = target.WhichOneof("call")
        call: pb.HttpCall | pb.GrpcCall
        planned_request: HttpRequest | GrpcRequest | None
        if kind == "http":
            call = target.http
            planned_request = _plain_http(call, max_path_bytes)
        elif kind == "grpc":
            call = target.grpc
            planned_request = _plain_grpc(call, max_path_bytes)
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
    return Plan(targets=tuple(planned), max_targets=limit, max_path_bytes=max_path_bytes)


def _plain_http(call: pb.HttpCall, max_path_bytes: int) -> HttpRequest | None:
    method = call.method or "GET"
    path = call.path
    payload = call.WhichOneof("payload")
    if method not in HTTP_METHODS or payload == "json" or not _plain_path(path, max_path_bytes):
        return None
    body = call.body if payload == "body" else None
    if method in BODILESS_METHODS and body is not None:
        if body:
            return None
        body = None  # an empty body is no body
    query: tuple[tuple[str, str], ...] = ()
    if call.query:
        query = tuple(sorted(call.query.items()))
        if any("{{" in value for _, value in query) or query_bytes(query) > max_path_bytes:
            return None
    headers: tuple[tuple[str, str], ...] = ()
    if call.headers:
        headers = tuple(sorted(call.headers.items()))
        folded = set()
        for name, value in headers:
            canonical = canonical_header(name)
            if (
                "{{" in value
                or not TOKEN.match(name)
                or "_" in name
                or canonical in FRAMING_HEADERS
                or canonical in folded
                or steering(canonical)
                or header_value_problem(value) is not None
            ):
                return None
            folded.add(canonical)
    return HttpRequest(method, path, query, headers, body)


def _plain_path(path: str, max_path_bytes: int) -> bool:
    """A path _path_problems accepts, without references (conservative: may say no)."""
    if not path.startswith("/") or path.startswith("//") or CONTROL_OR_SPACE.search(path):
        return False
    if "\\" in path or "?" in path or "#" in path or "{{" in path or not path.isascii():
        return False
    if len(path) > max_path_bytes:
        return False
    return ("." not in path and "%" not in path and ";" not in path) or path_problem(path) is None


def query_bytes(query: Iterable[tuple[str, str]]) -> int:
    """The size that server.max_path_bytes caps: names and values, UTF-8, with = and &."""
    return sum(len(name.encode()) + len(value.encode()) + 2 for name, value in query)


def _plain_grpc(call: pb.GrpcCall, max_path_bytes: int) -> GrpcRequest | None:
    method = call.method
    if call.metadata or call.HasField("json") or len(method) > max_path_bytes:
        return None
    if not GRPC_METHOD.match(method):
        return None
    return GrpcRequest(method, call.request, ())


def explained_plan(
    request: pb.AggregateRequest, config: Config, params: frozenset[str] = frozenset()
) -> Plan:
    """make_plan for any request: every check, each problem in a sentence. References may
    also name the sources in ``params`` (a named aggregate's {{params.NAME}}, which
    aggregates.py checks and substitutes before the plan runs)."""
    problems: list[str] = []
    limit = config.server.max_targets
    max_path_bytes = config.server.max_path_bytes
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
        # An id too long to be one is not repeated in every problem of its target.
        label = f"target {target.id!r}" if 0 < len(target.id) <= 64 else f"targets[{index}]"
        target_problems = list(_target_problems(target, config.upstreams, max_path_bytes))
        problems.extend(f"{label}: {problem}" for problem in target_problems)
        # Most targets have no {{...}}: look for references only where braces are.
        templated = any("{{" in text for text in _template_texts(target))
        if templated or target.for_each:
            problems.extend(f"{label}: {p}" for p in _template_problems(target, expanding, params))
        if not target_problems:
            planned.append(_plan_target(target, config.upstreams, templated))
    if any(target.depends_on for target in request.targets):
        problems.extend(_dependency_problems(request.targets))
    if problems:
        raise InvalidRequest(problems)
    return Plan(targets=tuple(planned), max_targets=limit, max_path_bytes=max_path_bytes)


def _id_problems(targets: Sequence[pb.Target]) -> Iterator[str]:
    seen: set[str] = set()
    for index, target in enumerate(targets):
        if not NAME.match(target.id):
            yield f"targets[{index}].id: {target.id!r} must match [A-Za-z0-9_.-]{{1,64}}"
        elif target.id in seen:
            yield f"targets[{index}].id: {target.id!r} is used by more than one target"
        seen.add(target.id)


def _target_problems(
    target: pb.Target, upstreams: Mapping[str, UpstreamConfig], max_path_bytes: int
) -> Iterator[str]:
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
    allowed = upstream.allowed_headers if upstream is not None else ()
    if kind == "http":
        yield from _http_problems(target.http, allowed, max_path_bytes)
    else:
        yield from _grpc_problems(target.grpc, allowed, max_path_bytes)
    if target.HasField("timeout") and target.timeout.ToNanoseconds() <= 0:
        yield "timeout: must be longer than 0"
    if len(target.depends_on) > MAX_DEPENDS_ON:
        yield (f"depends_on: {len(target.depends_on)} entries exceed {MAX_DEPENDS_ON} per target")


def _http_problems(call: pb.HttpCall, allowed: Sequence[str], max_path_bytes: int) -> Iterator[str]:
    method = call.method or "GET"
    if method not in HTTP_METHODS:
        yield f"http.method: {method!r} is not one of {', '.join(sorted(HTTP_METHODS))}"
    payload = call.WhichOneof("payload")
    if method in BODILESS_METHODS and (payload == "json" or (payload == "body" and call.body)):
        yield (
            f"http.{payload}: a {method} request carries no body (SPEC: a body there could be "
            "read as a second request); use POST, PUT, PATCH or DELETE"
        )
    yield from _path_problems(call.path, max_path_bytes)
    if call.query and query_bytes(call.query.items()) > max_path_bytes:
        yield (
            f"http.query: {query_bytes(call.query.items())} bytes of names and values exceed "
            f"server.max_path_bytes ({max_path_bytes})"
        )
    yield from _header_problems(call.headers, allowed)
    if payload == "json" and not _finite_json(call.json):
        yield "http.json: NaN and Infinity are not JSON numbers"


def _header_problems(headers: Mapping[str, str], allowed: Sequence[str]) -> Iterator[str]:
    for name, value in headers.items():
        problem = None if TOKEN.match(name) else "is not a valid header name"
        problem = problem or header_name_problem(name, allowed, FRAMING_HEADERS)
        if problem:
            yield f"http.headers: {name!r} {problem}"
        problem = header_value_problem(value)
        if problem:
            yield f"http.headers[{name!r}]: {problem}"
    for first, second in duplicate_names(sorted(headers)):
        yield f"http.headers: {first!r} and {second!r} are one header to an upstream"


def _path_problems(path: str, max_path_bytes: int) -> Iterator[str]:
    size = len(path.encode())
    if size > max_path_bytes:
        yield f"http.path: {size} bytes exceed server.max_path_bytes ({max_path_bytes})"
    elif not path.startswith("/") or path.startswith("//") or "\\" in path:
        yield f'http.path: {path!r} must be a path starting with "/" (no scheme or host)'
    elif CONTROL_OR_SPACE.search(path) or "?" in path or "#" in path:
        yield f"http.path: {path!r} contains whitespace, control characters, ? or # (use query)"
    else:
        problem = path_problem(path)
        if problem:
            yield f"http.path: {path!r} {problem}"


def _grpc_problems(call: pb.GrpcCall, allowed: Sequence[str], max_path_bytes: int) -> Iterator[str]:
    size = len(call.method.encode())
    if size > max_path_bytes:
        yield f"grpc.method: {size} bytes exceed server.max_path_bytes ({max_path_bytes})"
    elif not GRPC_METHOD.match(call.method):
        yield f"grpc.method: {call.method!r} is not a full method name /package.Service/Method"
    for key, value in call.metadata.items():
        if not METADATA_KEY.match(key) or key.endswith("-bin") or key.startswith("grpc-"):
            yield f"grpc.metadata: {key!r} is not a lowercase ASCII metadata key"
        else:
            problem = header_name_problem(key, allowed, UNFORWARDABLE)
            if problem:
                yield f"grpc.metadata: {key!r} {problem}"
        problem = header_value_problem(value, ascii_only=True)
        if problem:
            yield f"grpc.metadata[{key!r}]: {problem}"
    for first, second in duplicate_names(sorted(call.metadata)):
        yield f"grpc.metadata: {first!r} and {second!r} are one key to an upstream"
    if call.HasField("json"):
        if call.request:
            yield "grpc: set request (bytes) or json, not both"
        if not _finite_json(call.json):
            yield "grpc.json: NaN and Infinity are not JSON numbers"


def _dependency_problems(targets: Sequence[pb.Target]) -> Iterator[str]:
    graph: dict[str, list[str]] = {}
    for target in targets:
        if len(target.depends_on) > MAX_DEPENDS_ON:  # refused as it is: look no further
            graph[target.id] = []
            continue
        counts = collections.Counter(target.depends_on)  # in order of first appearance
        repeated = [dep for dep, count in counts.items() if count > 1]
        if repeated:
            listed = ", ".join(map(repr, repeated[:5])) + (" ..." if len(repeated) > 5 else "")
            yield f"target {target.id!r}: depends_on names {listed} more than once"
        graph[target.id] = list(counts)
    for target_id, deps in graph.items():
        for dep in deps:
            if dep == target_id:
                yield f"target {target_id!r}: depends_on names itself"
            elif dep not in graph:
                yield f"target {target_id!r}: depends_on names unknown target {dep!r}"
    cycle = _find_cycle(graph)
    if cycle:
        yield f"depends_on: cycle {' -> '.join(i if NAME.match(i) else repr(i) for i in cycle)}"


def _template_problems(
    target: pb.Target, expanding: set[str], params: frozenset[str] = frozenset()
) -> Iterator[str]:
    """References that name no dependency (or a for_each target, whose body is not one)."""
    if len(target.depends_on) > MAX_DEPENDS_ON:
        return  # refused for its depends_on already; the references cannot be checked
    if ITEM in target.depends_on:  # {{item...}} is for_each's element: that target is unreachable
        yield "depends_on names target 'item', but {{item}} is for_each's element"
    if target.for_each:
        yield from _for_each_problems(target.for_each, Sources(target.depends_on))
    sources = Sources(
        (*target.depends_on, ITEM, *params) if target.for_each else (*target.depends_on, *params)
    )
    found = _references(target)
    if len(found) > MAX_REFERENCES:
        yield f"more than {MAX_REFERENCES} {{{{...}}}} references (the limit per target)"
        return
    for raw in found:
        reference = sources.parse(raw)
        if reference is None:
            yield (
                f"{{{{{raw}}}}} names no target in depends_on"
                + (" (nor item)" if target.for_each else "")
            )
        elif reference.source in params:
            continue
        elif reference.source in expanding:
            yield f"{{{{{raw}}}}} names for_each target {reference.source!r}"


def _references(target: pb.Target) -> list[str]:
    """The target's references, at most one more than MAX_REFERENCES."""
    found: list[str] = []
    for text in _template_texts(target):
        for raw in references(text):
            found.append(raw)
            if len(found) > MAX_REFERENCES:
                return found
    return found


def _for_each_problems(text: str, sources: Sources) -> Iterator[str]:
    found = list(itertools.islice(references(text), 2))
    reference = sources.parse(found[0]) if len(found) == 1 else None
    if reference is None or text.strip() != "{{" + found[0] + "}}":
        yield f"for_each: {text!r} must be one {{{{id.path}}}} naming a target in depends_on"


def _template_texts(target: pb.Target) -> Iterator[str]:
    if target.WhichOneof("call") == "grpc":
        yield from target.grpc.metadata.values()
        if target.grpc.HasField("json") and _finite_json(target.grpc.json):
            yield from json_strings(json_format.MessageToDict(target.grpc.json))
        return
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
        call_json = target.grpc.json if target.grpc.HasField("json") else None
        request = GrpcRequest(
            method=target.grpc.method,
            request=target.grpc.request,
            metadata=tuple(sorted(target.grpc.metadata.items())) if target.grpc.metadata else (),
            json_body=json_format.MessageToDict(call_json) if call_json is not None else None,
            json_size=call_json.ByteSize() if call_json is not None else 0,
        )
    upstream_name = target.http.upstream if target.HasField("http") else target.grpc.upstream
    for_each = None
    found = list(references(target.for_each)) if target.for_each else []
    if found:  # a bad for_each is reported by _template_problems; the plan is then dropped
        for_each = Sources(target.depends_on).parse(found[0])
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
        # An empty body on a bodiless method is no body (a non-empty one is refused).
        bodiless = (call.method or "GET") in BODILESS_METHODS
        return None if bodiless and not call.body else call.body
    if payload == "json":
        return json_format.MessageToJson(call.json, indent=None).encode()
    return None
