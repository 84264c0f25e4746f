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

Each field of a target is read once (``Written``): a read of a upb message's field costs
0.1-0.9 µs, the most of planning. A request of ids, HTTP upstreams and paths alone, proven by
its size, has its other fields taken as their defaults without reading them (written.py); the
rules are the same and see the same values either way.
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
from aggregator.errors import InvalidRequest, Problem, Rule, Rules, conjunction
from aggregator.request import (
    GRPC_RULES,
    HTTP_RULES,
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
    HTTP_METHODS,
    ITEM,
    METADATA_KEY,
    NAME,
    TOKEN,
    UNFORWARDABLE,
)
from aggregator.written import Written, bare, heads, read

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


# Not frozen, as the request's classes (request.py): read-only by convention, changed copies made
# with dataclasses.replace; a frozen __init__ cost 1.3 µs a plan against 0.5 (measured).
@dataclass(slots=True)
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
    heads_, size = heads(targets)
    bare_request = size == request.ByteSize()
    problems: list[Problem] = []
    planned = []
    seen: set[str] = set()
    expanding: set[str] | None = None
    depends = False
    upstreams = config.upstreams
    for index, head in enumerate(heads_):
        target_id = head[1]
        if target_id in seen or not NAME.match(target_id):
            problems.append(_id_problem(index, target_id, seen))
        seen.add(target_id)
        written = bare(head) if bare_request else read(head)
        if written.for_each and expanding is None:
            expanding = {t.id for t in targets if t.for_each}
        if written.depends_on:
            depends = True
        one = _plan_target(written, index, upstreams, server, params, expanding or _NONE, problems)
        if one is not None:
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


def _explain(rules: Rules, problems: list[Problem], target_id: str, *subject: Any) -> bool:
    """Adds the problem of every rule ``subject`` breaks; False if any."""
    before = len(problems)
    problems.extend(rules.broken(target_id, *subject))
    return len(problems) == before


def _plan_target(
    w: Written,
    index: int,
    upstreams: Mapping[str, UpstreamConfig],
    server: ServerConfig,
    params: frozenset[str],
    expanding: Collection[str],
    problems: list[Problem],
) -> PlannedTarget | None:
    """``w`` planned, or None with its problems added to ``problems``."""
    found: list[Problem] = []
    target_id, call, request = w.id, w.call, w.request
    upstream = upstreams.get(w.upstream) if call is not None else None
    # Every rule at once when nothing is to be read or checked entry by entry; else each
    # table walked in turn (_checked), explaining what it finds.
    plain = False
    if w.json is None:
        if isinstance(request, HttpRequest):
            plain = not request.headers and HTTP_PLAIN(
                w, upstream, server, request, server.max_path_bytes
            )
        elif request is not None:
            plain = not request.metadata and GRPC_PLAIN(
                w, upstream, server, request, server.max_path_bytes
            )
    ok = True
    if not plain:
        request, ok = _checked(w, upstream, server, found)
        if not ok:
            request = None
    has_templates = request is not None and templated(request)
    for_each = w.for_each
    if has_templates or for_each:
        found.extend(
            Problem(target_id, "", problem)
            for problem in template_problems(w.target, call if ok else None, expanding, params)
        )
    if found:
        problems.extend(_placed(found, index, target_id))
        return None
    assert request is not None
    assert upstream is not None
    depends_on = w.depends_on
    reference = None
    if for_each:  # a bad for_each was reported: this one is one reference
        reference = Sources(depends_on).parse(next(references(for_each)))
    # Positional arguments: keywords cost a dataclass __init__ twice as much (measured).
    return PlannedTarget(
        target_id, upstream, request, w.required,
        w.timeout / 1e9 if w.timeout is not None else None,
        tuple(depends_on) if depends_on else (),
        w.fallback, w.decode_json, has_templates, reference, None, None, True,
    )  # fmt: skip


def _checked(
    w: Written, upstream: UpstreamConfig | None, server: ServerConfig, found: list[Problem]
) -> tuple[HttpRequest | GrpcRequest | None, bool]:
    """The target's request (its JSON read) and whether the target's rules hold, with every
    problem of the target and of its request added to ``found``."""
    target_id, kind, request = w.id, w.kind, w.request
    if isinstance(request, HttpRequest):
        ok = HTTP_TARGET_RULES.all_hold(w, upstream, server) or _explain(
            HTTP_TARGET_RULES, found, target_id, w, upstream, server
        )
        if request.headers:
            ok = (
                _names_ok(request.headers, HEADER_NAME_RULES, "http", upstream, found, target_id)
                and ok
            )
    elif request is not None:
        ok = GRPC_TARGET_RULES.all_hold(w, upstream, server) or _explain(
            GRPC_TARGET_RULES, found, target_id, w, upstream, server
        )
        if request.metadata:
            ok = (
                _names_ok(request.metadata, METADATA_KEY_RULES, "grpc", upstream, found, target_id)
                and ok
            )
    else:
        ok = _explain(TARGET_RULES, found, target_id, w, upstream, server)
    if request is not None:
        # The request's own rules, with a stand-in upstream when it names none (the shape of
        # a path is wrong whatever the upstream), so every problem is reported at once.
        checked_by = upstream if ok and upstream is not None else _stand_in(kind, upstream)
        if ok and w.json is not None:
            request = _with_json(request, w.json)
        if not request_allowed(checked_by, request, server.max_path_bytes):
            found.extend(request_problems(checked_by, request, target_id, server.max_path_bytes))
    return request, ok


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


def _upstream_field(w: Written, *_: Any) -> str:
    return f"{w.kind}.upstream"


def _json_cap(upstream: UpstreamConfig | None, server: ServerConfig) -> tuple[int, str]:
    if upstream is None:
        return server.max_request_bytes, "server.max_request_bytes"
    return upstream.max_request_bytes, f"upstreams.{upstream.name}.max_request_bytes"


def _json_size_problem(w: Written, u: UpstreamConfig | None, s: ServerConfig) -> str:
    limit, key = _json_cap(u, s)
    return f"{w.json.ByteSize()} bytes exceed {key} ({limit})"  # type: ignore[union-attr]


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

# Rules about a target as a caller wrote it, over (w: its fields, read once, u: the upstream
# it names, s: the server's config).
_TARGET_RULES = (
    Rule("", "w.call is not None", lambda *_: "one of http or grpc is required"),
    Rule(_upstream_field, "u or w.call is None or w.upstream != ''", lambda *_: "required", "up"),
    Rule(
        _upstream_field,
        "w.call is None or u is not None",
        lambda *_: "names no configured upstream",
        "up",
    ),
    Rule(
        _upstream_field,
        "u is None or u.kind == w.kind",
        lambda w, u, s: f"names a {u.kind} upstream, not {w.kind}",
        "up",
    ),
    Rule(
        "timeout",
        "w.timeout is None or w.timeout > 0",
        lambda *_: "must be longer than 0",
    ),
    Rule(
        "depends_on",
        "len(w.depends_on) <= MAX_DEPENDS_ON",
        lambda w, u, s: f"{len(w.depends_on)} entries exceed {MAX_DEPENDS_ON} per target",
    ),
)
SUBJECT = "w, u, s"
TARGET_RULES = Rules(SUBJECT, _TARGET_RULES, _NAMES)


def _json_rules(field: str) -> tuple[Rule, ...]:
    """A JSON payload is sized before anything reads it (ByteSize counts in C), then walked
    once for NaN and Infinity."""
    return (
        Rule(
            field,
            "w.json is None or w.json.ByteSize() <= _json_cap(u, s)[0]",
            _json_size_problem,
            "json",
        ),
        Rule(
            field,
            "w.json is None or _finite_json(w.json)",
            lambda *_: "NaN and Infinity are not JSON numbers",
            "json",
        ),
    )


# ... and with the rules of its kind of call.
HTTP_TARGET_RULES = Rules(
    SUBJECT,
    (
        *_TARGET_RULES,
        *_json_rules("http.json"),
    ),
    _NAMES,
)
GRPC_TARGET_RULES = Rules(
    SUBJECT,
    (
        *_TARGET_RULES,
        Rule(
            "grpc",
            "not w.request.request or w.json is None",
            lambda *_: "set request (bytes) or json, not both",
        ),
        *_json_rules("grpc.json"),
    ),
    _NAMES,
)
# The fast path's one conjunction per kind: the target's rules, then its request's (request.py),
# over (w, u, s, r: the request, m: server.max_path_bytes). u is both tables' upstream, as it is
# whenever the target's rules hold (they come first, and hold only for a configured upstream
# of the target's kind).
HTTP_PLAIN = conjunction("w, u, s, r, m", HTTP_TARGET_RULES, HTTP_RULES)
GRPC_PLAIN = conjunction("w, u, s, r, m", GRPC_TARGET_RULES, GRPC_RULES)
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
