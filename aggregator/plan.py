"""From an AggregateRequest to a Plan: every check happens here, before anything is sent.

``make_plan`` either returns a Plan whose every target is ready to call, or raises
InvalidRequest listing each problem (a ``Problem``: target, field, message), e.g.::

    target 'price': http.path: must be a path starting with "/" (no scheme or host)

The rules are tables of (predicate, problem): ``CALL_RULES`` and friends here, about what a
caller wrote; the request's own (request.py) about what an upstream gets. Each table is walked
with short-circuit first (the fast path: every predicate holds) and whole only when one fails,
to list the problems. Every check costs time linear in the size of the request: the number of
targets is checked before anything else, a JSON payload's size before it is read, and what can
multiply is capped per target: ``MAX_DEPENDS_ON`` entries in ``depends_on`` and
``MAX_REFERENCES`` ``{{...}}`` references.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf import json_format, struct_pb2

from aggregator.composition import (
    MAX_DEPENDS_ON,
    dependency_problems,
    template_problems,
    templated,
)
from aggregator.config import Config, ServerConfig, UpstreamConfig
from aggregator.errors import InvalidRequest, Problem, Rule, Rules
from aggregator.request import (
    GrpcRequest,
    HttpRequest,
    request_allowed,
    request_problems,
)
from aggregator.security.fields import duplicate_names, header_name_problem
from aggregator.substitution import (
    Reference,
    Sources,
    references,
)
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import (
    BODILESS_METHODS,
    HTTP_METHODS,
    ITEM,
    METADATA_KEY,
    NAME,
    TOKEN,
    UNFORWARDABLE,
)

Call = pb.HttpCall | pb.GrpcCall
_NONE: frozenset[str] = frozenset()


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
    # Whether the request was checked against its upstream's rules as it is (request.py):
    # a changed copy (forwarded metadata, bound parameters) is made with checked=False.
    checked: bool = False

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


def make_plan(
    request: pb.AggregateRequest, config: Config, params: frozenset[str] = frozenset()
) -> Plan:
    """Validates ``request`` against ``config``; raises InvalidRequest listing every problem.
    References may also name the sources in ``params`` (a named aggregate's
    {{params.NAME}}, which aggregates.py checks and substitutes before the plan runs)."""
    targets = request.targets
    server = config.server
    # Counted before anything is read: a request of many targets costs no more than this.
    if not targets:
        raise InvalidRequest([Problem(None, "targets", "at least one target is required")])
    if len(targets) > server.max_targets:
        raise InvalidRequest(
            [
                Problem(
                    None,
                    "targets",
                    f"{len(targets)} targets exceed server.max_targets ({server.max_targets})",
                )
            ]
        )
    problems: list[Problem] = []
    planned = []
    seen: set[str] = set()
    expanding: set[str] | None = None
    depends = False
    for index, target in enumerate(targets):
        target_id = target.id
        if target_id in seen or not NAME.match(target_id):
            problems.append(_id_problem(index, target_id, seen))
        seen.add(target_id)
        for_each = target.for_each
        if for_each and expanding is None:
            expanding = {t.id for t in targets if t.for_each}
        one = _plan_target(
            target, target_id, for_each, index, config.upstreams, server, params,
            expanding or _NONE, problems,
        )  # fmt: skip
        if one is None:
            depends = depends or bool(target.depends_on)
        else:
            depends = depends or bool(one.depends_on)
            planned.append(one)
    if depends:
        problems.extend(dependency_problems(targets))
    if problems:
        raise InvalidRequest(problems)
    return Plan(tuple(planned), server.max_targets, server.max_path_bytes)


def _id_problem(index: int, target_id: str, seen: set[str]) -> Problem:
    field = f"targets[{index}].id"
    if not NAME.match(target_id):
        return Problem(None, field, "must match [A-Za-z0-9_.-]{1,64}")
    return Problem(None, field, f"{target_id!r} is used by more than one target")


def _explain(rules: Rules, problems: list[Problem], subject: tuple[Any, ...]) -> bool:
    """Adds the problem of every rule ``subject`` (a target first) breaks; False if any."""
    before = len(problems)
    problems.extend(rules.broken(subject[0].id, *subject))
    return len(problems) == before


def _plan_target(
    target: pb.Target,
    target_id: str,
    for_each: str,
    index: int,
    upstreams: Mapping[str, UpstreamConfig],
    server: ServerConfig,
    params: frozenset[str],
    expanding: Collection[str],
    problems: list[Problem],
) -> PlannedTarget | None:
    """``target`` planned, or None with its problems added to ``problems``."""
    found: list[Problem] = []
    kind = target.WhichOneof("call")
    call: Call | None = None
    request: HttpRequest | GrpcRequest | None = None
    if kind == "http":
        call = target.http
        request = _http_request(call)
    elif kind == "grpc":
        call = target.grpc
        request = _grpc_request(call)
    upstream = upstreams.get(call.upstream) if call is not None else None
    if isinstance(request, HttpRequest):  # read from the payload already
        has_json = request.json_body is _UNREAD
    else:
        has_json = call is not None and call.HasField("json")
    subject = (target, kind, call, upstream, server, has_json)
    if isinstance(request, HttpRequest):
        ok = HTTP_TARGET_RULES.all_hold(*subject) or _explain(HTTP_TARGET_RULES, found, subject)
        if request.headers:
            ok = (
                _names_ok(request.headers, HEADER_NAME_RULES, "http", upstream, found, target_id)
                and ok
            )
    elif request is not None:
        ok = GRPC_TARGET_RULES.all_hold(*subject) or _explain(GRPC_TARGET_RULES, found, subject)
        if request.metadata:
            ok = (
                _names_ok(request.metadata, METADATA_KEY_RULES, "grpc", upstream, found, target_id)
                and ok
            )
    else:
        ok = _explain(TARGET_RULES, found, subject)
    if request is not None:
        # The request's own rules, with a stand-in upstream when it names none (the shape of
        # a path is wrong whatever the upstream), so every problem is reported at once.
        checked_by = upstream if ok and upstream is not None else _stand_in(kind, upstream)
        if ok and has_json:
            request = _with_json(request, call.json)  # type: ignore[union-attr]
        if not request_allowed(checked_by, request, server.max_path_bytes):
            found.extend(request_problems(checked_by, request, target_id, server.max_path_bytes))
        if not ok:
            request = None
    has_templates = request is not None and templated(request)
    if has_templates or for_each:
        found.extend(
            Problem(target_id, "", problem)
            for problem in template_problems(target, call if ok else None, expanding, params)
        )
    if found:
        problems.extend(_placed(found, index, target_id))
        return None
    assert request is not None
    assert upstream is not None
    depends_on = target.depends_on
    reference = None
    if for_each:  # a bad for_each was reported: this one is one reference
        reference = Sources(depends_on).parse(next(references(for_each)))
    # Positional arguments: keywords cost a dataclass __init__ twice as much (measured).
    return PlannedTarget(
        target_id, upstream, request, target.required,
        target.timeout.ToNanoseconds() / 1e9 if target.HasField("timeout") else None,
        tuple(depends_on) if depends_on else (),
        target.fallback if target.HasField("fallback") else None,
        target.decode_json, has_templates, reference, None, None, True,
    )  # fmt: skip


def _placed(found: list[Problem], index: int, target_id: str) -> Iterator[Problem]:
    """An id too long to be one is not repeated in every problem: its index stands instead."""
    if 0 < len(target_id) <= 64:
        yield from found
        return
    for problem in found:
        field = f"targets[{index}]" + (f".{problem.field}" if problem.field else "")
        yield Problem(None, field, problem.message)


def _names_ok(
    pairs: tuple[tuple[str, str], ...],
    rules: Rules,
    kind: str,
    upstream: UpstreamConfig | None,
    problems: list[Problem],
    target_id: str,
) -> bool:
    allowed = upstream.allowed_headers if upstream is not None else ()
    ok = True
    for name, _ in pairs:
        if not rules.all_hold(name, allowed):
            problems.extend(rules.broken(target_id, name, allowed))
            ok = False
    field = "http.headers" if kind == "http" else "grpc.metadata"
    what = "header" if kind == "http" else "key"
    for first, second in duplicate_names([name for name, _ in pairs]) if len(pairs) > 1 else ():
        problems.append(
            Problem(target_id, field, f"{first!r} and {second!r} are one {what} to an upstream")
        )
        ok = False
    return ok


def _upstream_field(t: pb.Target, kind: str | None, *_: Any) -> str:
    return f"{kind}.upstream"


def _json_cap(upstream: UpstreamConfig | None, server: ServerConfig) -> tuple[int, str]:
    if upstream is None:
        return server.max_request_bytes, "server.max_request_bytes"
    return upstream.max_request_bytes, f"upstreams.{upstream.name}.max_request_bytes"


def _json_size_problem(
    t: pb.Target, k: str, call: Call, u: UpstreamConfig | None, s: ServerConfig, j: bool
) -> str:
    limit, key = _json_cap(u, s)
    return f"{call.json.ByteSize()} bytes exceed {key} ({limit})"


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


# What the rules' predicates read.
_NAMES: dict[str, Any] = {
    "HTTP_METHODS": HTTP_METHODS,
    "MAX_DEPENDS_ON": MAX_DEPENDS_ON,
    "METADATA_KEY": METADATA_KEY,
    "TOKEN": TOKEN,
    "UNFORWARDABLE": UNFORWARDABLE,
    "header_name_problem": header_name_problem,
    "_finite_json": _finite_json,
    "_json_cap": _json_cap,
}

# Rules about a target as a caller wrote it, over (t: the target, k: its kind, c: its call,
# u: the upstream it names, s: the server's config).
_TARGET_RULES = (
    Rule("", "c is not None", lambda *_: "one of http or grpc is required"),
    Rule(_upstream_field, "u or c is None or c.upstream != ''", lambda *_: "required", "up"),
    Rule(
        _upstream_field,
        "c is None or u is not None",
        lambda *_: "names no configured upstream",
        "up",
    ),
    Rule(
        _upstream_field,
        "u is None or u.kind == k",
        lambda t, k, c, u, *_: f"names a {u.kind} upstream, not {k}",
        "up",
    ),
    Rule(
        "timeout",
        "not t.HasField('timeout') or t.timeout.ToNanoseconds() > 0",
        lambda *_: "must be longer than 0",
    ),
    Rule(
        "depends_on",
        "len(t.depends_on) <= MAX_DEPENDS_ON",
        lambda t, *_: f"{len(t.depends_on)} entries exceed {MAX_DEPENDS_ON} per target",
    ),
)
TARGET_RULES = Rules("t, k, c, u, s, j", _TARGET_RULES, _NAMES)


def _json_rules(field: str) -> tuple[Rule, ...]:
    """A JSON payload is sized before anything reads it (ByteSize counts in C), then walked
    once for NaN and Infinity."""
    return (
        Rule(
            field,
            "not j or c.json.ByteSize() <= _json_cap(u, s)[0]",
            _json_size_problem,
            "json",
        ),
        Rule(
            field,
            "not j or _finite_json(c.json)",
            lambda *_: "NaN and Infinity are not JSON numbers",
            "json",
        ),
    )


# ... and with the rules of its kind of call.
HTTP_TARGET_RULES = Rules(
    "t, k, c, u, s, j",
    (
        *_TARGET_RULES,
        *_json_rules("http.json"),
    ),
    _NAMES,
)
GRPC_TARGET_RULES = Rules(
    "t, k, c, u, s, j",
    (
        *_TARGET_RULES,
        Rule(
            "grpc",
            "not c.request or not c.HasField('json')",
            lambda *_: "set request (bytes) or json, not both",
        ),
        *_json_rules("grpc.json"),
    ),
    _NAMES,
)
# Per name a caller set, over (name, allowed: the upstream's allowed_headers).
HEADER_NAME_RULES = Rules(
    "name, allowed",
    (
        Rule(
            "http.headers",
            "TOKEN.match(name) is not None",
            lambda name, allowed: f"{name!r} is not a valid header name",
            "name",
        ),
        Rule(
            "http.headers",
            "header_name_problem(name, allowed, ()) is None",
            lambda name, allowed: f"{name!r} {header_name_problem(name, allowed, ())}",
            "name",
        ),
    ),
    _NAMES,
)
METADATA_KEY_RULES = Rules(
    "name, allowed",
    (
        Rule(
            "grpc.metadata",
            "METADATA_KEY.match(name) is not None and not name.endswith('-bin') "
            "and not name.startswith('grpc-')",
            lambda name, allowed: f"{name!r} is not a lowercase ASCII metadata key",
            "name",
        ),
        Rule(
            "grpc.metadata",
            "header_name_problem(name, allowed, UNFORWARDABLE) is None",
            lambda name, allowed: f"{name!r} {header_name_problem(name, allowed, UNFORWARDABLE)}",
            "name",
        ),
    ),
    _NAMES,
)


def _http_request(call: pb.HttpCall) -> HttpRequest:
    """The request a call makes, its JSON payload not read yet (``_with_json`` reads it; until
    then the payload stands as an empty body, so the body rules see that there is one)."""
    method = call.method or "GET"
    body = json_body = None
    payload = call.WhichOneof("payload")
    if payload == "body" and (call.body or method not in BODILESS_METHODS):
        body = call.body  # an empty body on a bodiless method is no body
    elif payload == "json":
        body, json_body = b"", _UNREAD
    return HttpRequest(
        method,
        call.path,
        _pairs(call.query),
        _pairs(call.headers),
        body,
        json_body,
    )


_UNREAD = object()  # a JSON payload not read yet


def _stand_in(kind: str | None, upstream: UpstreamConfig | None) -> UpstreamConfig:
    """The upstream a request is checked against when its own is unknown or refused: no
    rules of its own, the default sizes."""
    if upstream is not None and upstream.kind == kind:
        return upstream
    return _STAND_INS["grpc" if kind == "grpc" else "http"]


_STAND_INS = {
    "http": UpstreamConfig(name="(none)", kind="http", url="http://127.0.0.1"),
    "grpc": UpstreamConfig(name="(none)", kind="grpc", address="127.0.0.1:1"),
}


def _grpc_request(call: pb.GrpcCall) -> GrpcRequest:
    return GrpcRequest(call.method, call.request, _pairs(call.metadata))


def _pairs(entries: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A map's entries sorted (read by key: a map's items() walks it in Python)."""
    if not entries:
        return ()
    return tuple(sorted([(key, entries[key]) for key in entries]))


def _with_json(
    request: HttpRequest | GrpcRequest, value: struct_pb2.Value
) -> HttpRequest | GrpcRequest:
    """``request`` with its JSON payload, read once (its size and numbers were checked)."""
    json_body = json_format.MessageToDict(value)
    if isinstance(request, GrpcRequest):
        return replace(request, json_body=json_body, json_size=value.ByteSize())
    headers = request.headers
    if not any(name.lower() == "content-type" for name, _ in headers):
        headers = (*headers, ("Content-Type", "application/json"))
    body = json.dumps(json_body, separators=(",", ":")).encode()
    return replace(request, headers=headers, body=body, json_body=json_body)
