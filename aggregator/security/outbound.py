"""What may reach an upstream: forwarded caller metadata and per-upstream request rules.

Pure functions over a planned request, so they run wherever a request is final: right after
``make_plan`` (server.py), and again after run-time substitution of ``{{id.path}}`` references
(``target_problems`` on the rendered request). Each problem is one sentence naming the target::

    target 'price': http.path '/admin/x' is outside upstreams.catalog.path_prefixes (/v1/)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import unquote

from aggregator.config import UNFORWARDABLE, UpstreamConfig
from aggregator.errors import InvalidRequest
from aggregator.plan import GrpcRequest, HttpRequest, Plan, PlannedTarget, dot_segments

_HOP_BY_HOP = UNFORWARDABLE - {"content-type", "user-agent", "x-request-id"}
_NONE: frozenset[str] = frozenset()


def forward_caller_metadata(plan: Plan, metadata: Iterable[tuple[str, Any]]) -> Plan:
    """``plan`` with each upstream's ``forward_headers`` copied from the caller's metadata.

    A header the target sets itself is kept as set. Only the first value of a key is
    forwarded (HTTP would merge repeats). Raises InvalidRequest for values that cannot be sent.
    """
    wanted = {name for target in plan.targets for name in target.upstream.forward_headers}
    if not wanted:
        return plan
    values: dict[str, str] = {}
    for key, value in metadata:
        if key in wanted and key not in values and isinstance(value, str):
            values[key] = value
    problems = [
        f"metadata {key!r}: forwarded values may not contain {{{{ (references are the "
        "request's own)"
        for key, value in values.items()
        if "{{" in value
    ]
    if problems:
        raise InvalidRequest(problems)
    return replace(plan, targets=tuple(_forwarded(target, values) for target in plan.targets))


def _forwarded(target: PlannedTarget, values: dict[str, str]) -> PlannedTarget:
    request = target.request
    own = {name.lower() for name, _ in _pairs(request)}
    extra = tuple(
        (name, values[name])
        for name in target.upstream.forward_headers
        if name in values and name not in own
    )
    if not extra:
        return target
    if isinstance(request, HttpRequest):
        return replace(target, request=replace(request, headers=request.headers + extra))
    return replace(target, request=replace(request, metadata=request.metadata + extra))


def plan_problems(plan: Plan) -> list[str]:
    """Every rule broken by any target of ``plan`` (see ``target_problems``)."""
    return [
        problem
        for target in plan.targets
        for problem in target_problems(target.upstream, target.request, target.id)
    ]


def target_problems(
    upstream: UpstreamConfig, request: HttpRequest | GrpcRequest, target_id: str
) -> list[str]:
    """What in ``request`` upstream ``upstream`` does not accept; empty when it may be sent."""
    if plainly_allowed(upstream, request):
        return []
    return explained_problems(upstream, request, target_id)


def explained_problems(
    upstream: UpstreamConfig, request: HttpRequest | GrpcRequest, target_id: str
) -> list[str]:
    """target_problems without its fast path: every rule checked, each problem a sentence."""
    label = f"target {target_id!r}: "
    rules = _http_problems if isinstance(request, HttpRequest) else _grpc_problems
    problems = [*rules(upstream, request), *_size_problems(upstream, request)]
    return [label + problem for problem in problems]


def plainly_allowed(upstream: UpstreamConfig, request: HttpRequest | GrpcRequest) -> bool:
    """The hot path of target_problems: True only if it would find nothing (conservative:
    may say False for a request the rules allow; the full check then runs)."""
    if isinstance(request, GrpcRequest):
        body, pairs = request.request, request.metadata
        allowed = upstream.allowed_methods
        if allowed and not grpc_method_allowed(request.method, allowed):
            return False
    else:
        body, pairs = request.body or b"", request.headers
        path = request.path
        if upstream.allowed_methods and request.method not in upstream.allowed_methods:
            return False
        if "." in path or "%" in path:
            return False
        if upstream.path_prefixes and not path_allowed(path, upstream.path_prefixes):
            return False
    if len(body) > upstream.max_request_bytes or len(pairs) > upstream.max_headers:
        return False
    if not pairs:
        return True
    size = 0
    hop_by_hop = _HOP_BY_HOP if isinstance(request, HttpRequest) else _NONE
    for name, value in pairs:
        if name.lower() in hop_by_hop or "\r" in value or "\n" in value or "\x00" in value:
            return False
        size += len(name.encode()) + len(value.encode())
    return size <= upstream.max_header_bytes


def _http_problems(upstream: UpstreamConfig, request: Any) -> Iterator[str]:
    assert isinstance(request, HttpRequest)
    key = f"upstreams.{upstream.name}"
    if upstream.allowed_methods and request.method not in upstream.allowed_methods:
        allowed = ", ".join(upstream.allowed_methods)
        yield f"http.method {request.method!r} is not in {key}.allowed_methods ({allowed})"
    if dot_segments(request.path):
        yield f"http.path {request.path!r} contains . or .. segments"
    elif upstream.path_prefixes and not path_allowed(request.path, upstream.path_prefixes):
        prefixes = ", ".join(upstream.path_prefixes)
        yield f"http.path {request.path!r} is outside {key}.path_prefixes ({prefixes})"
    for name, value in request.headers:
        if name.lower() in _HOP_BY_HOP:
            yield f"http.headers: {name!r} is a hop-by-hop or framing header and is never sent"
        if any(ch in value for ch in "\r\n\x00"):
            yield f"http.headers[{name!r}]: value contains CR, LF or NUL"


def path_allowed(path: str, prefixes: Sequence[str]) -> bool:
    """Whether ``path`` lies under a prefix, as sent and percent-decoded (so ``%2F`` cannot
    smuggle a path out). A prefix without a trailing / matches whole segments only."""
    decoded = unquote(path)
    return any(_under(path, prefix) and _under(decoded, prefix) for prefix in prefixes)


def _under(path: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def _grpc_problems(upstream: UpstreamConfig, request: Any) -> Iterator[str]:
    assert isinstance(request, GrpcRequest)
    allowed = upstream.allowed_methods
    if allowed and not grpc_method_allowed(request.method, allowed):
        yield (
            f"grpc.method {request.method!r} is not in upstreams.{upstream.name}.allowed_methods "
            f"({', '.join(allowed)})"
        )


def grpc_method_allowed(method: str, allowed: Sequence[str]) -> bool:
    service = method.rsplit("/", 1)[0]
    return any(pattern in (method, service + "/*") for pattern in allowed)


def _size_problems(upstream: UpstreamConfig, request: HttpRequest | GrpcRequest) -> Iterator[str]:
    key = f"upstreams.{upstream.name}"
    kind, body = (
        ("http body", request.body or b"")
        if isinstance(request, HttpRequest)
        else ("grpc.request", request.request)
    )
    if len(body) > upstream.max_request_bytes:
        yield (
            f"{kind} of {len(body)} bytes exceeds {key}.max_request_bytes "
            f"({upstream.max_request_bytes})"
        )
    pairs = _pairs(request)
    what = "http.headers" if isinstance(request, HttpRequest) else "grpc.metadata"
    if len(pairs) > upstream.max_headers:
        yield f"{what}: {len(pairs)} entries exceed {key}.max_headers ({upstream.max_headers})"
    size = sum(len(name.encode()) + len(value.encode()) for name, value in pairs)
    if size > upstream.max_header_bytes:
        yield (
            f"{what}: {size} bytes of names and values exceed {key}.max_header_bytes "
            f"({upstream.max_header_bytes})"
        )


def _pairs(request: HttpRequest | GrpcRequest) -> tuple[tuple[str, str], ...]:
    return request.headers if isinstance(request, HttpRequest) else request.metadata
