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

from aggregator.config import ServerConfig, UpstreamConfig
from aggregator.errors import InvalidRequest
from aggregator.plan import (
    GrpcRequest,
    HttpRequest,
    Plan,
    PlannedTarget,
    query_bytes,
)
from aggregator.security.fields import canonical_header, header_value_problem, path_problem
from aggregator.security.fields import path_allowed as path_allowed
from aggregator.vocabulary import BODILESS_METHODS, FRAMING_HEADERS

_NONE: frozenset[str] = frozenset()
MAX_PATH_BYTES = ServerConfig().max_path_bytes


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
    # As an upstream reads names: a target's own x_tenant hides a forwarded x-tenant too.
    own = {canonical_header(name) for name, _ in _pairs(request)}
    extra = tuple(
        (name, values[name])
        for name in target.upstream.forward_headers
        if name in values and canonical_header(name) not in own
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
        for problem in target_problems(
            target.upstream, target.request, target.id, plan.max_path_bytes
        )
    ]


def target_problems(
    upstream: UpstreamConfig,
    request: HttpRequest | GrpcRequest,
    target_id: str,
    max_path_bytes: int = MAX_PATH_BYTES,
) -> list[str]:
    """What in ``request`` upstream ``upstream`` does not accept; empty when it may be sent."""
    if plainly_allowed(upstream, request, max_path_bytes):
        return []
    return explained_problems(upstream, request, target_id, max_path_bytes)


def explained_problems(
    upstream: UpstreamConfig,
    request: HttpRequest | GrpcRequest,
    target_id: str,
    max_path_bytes: int = MAX_PATH_BYTES,
) -> list[str]:
    """target_problems without its fast path: every rule checked, each problem a sentence."""
    label = f"target {target_id!r}: "
    problems = (
        [*_http_problems(upstream, request, max_path_bytes), *_header_problems(request.headers)]
        if isinstance(request, HttpRequest)
        else [*_grpc_problems(upstream, request), *_metadata_problems(request.metadata)]
    )
    problems.extend(_size_problems(upstream, request))
    return [label + problem for problem in problems]


def plainly_allowed(
    upstream: UpstreamConfig,
    request: HttpRequest | GrpcRequest,
    max_path_bytes: int = MAX_PATH_BYTES,
) -> bool:
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
        if request.body is not None and request.method in BODILESS_METHODS:
            return False
        if upstream.allowed_methods and request.method not in upstream.allowed_methods:
            return False
        if "." in path or "%" in path or ";" in path or "\\" in path or not path.isascii():
            return False
        if len(path) > max_path_bytes or not path.isprintable():
            return False
        if request.query and query_bytes(request.query) > max_path_bytes:
            return False
        if upstream.path_prefixes and not path_allowed(path, upstream.path_prefixes):
            return False
    if len(body) > upstream.max_request_bytes or len(pairs) > upstream.max_headers:
        return False
    if not pairs:
        return True
    size = 0
    grpc = isinstance(request, GrpcRequest)
    hop_by_hop = _NONE if grpc else FRAMING_HEADERS
    for name, value in pairs:
        if name.lower() in hop_by_hop or header_value_problem(value, ascii_only=grpc):
            return False
        size += len(name.encode()) + len(value.encode())
    return size <= upstream.max_header_bytes


def _http_problems(
    upstream: UpstreamConfig, request: HttpRequest, max_path_bytes: int
) -> Iterator[str]:
    key = f"upstreams.{upstream.name}"
    if upstream.allowed_methods and request.method not in upstream.allowed_methods:
        allowed = ", ".join(upstream.allowed_methods)
        yield f"http.method {request.method!r} is not in {key}.allowed_methods ({allowed})"
    if request.body is not None and request.method in BODILESS_METHODS:
        yield f"http body: a {request.method} request carries no body"
    yield from _path_problems(upstream, request.path, max_path_bytes)
    if request.query and query_bytes(request.query) > max_path_bytes:
        yield (
            f"http.query: {query_bytes(request.query)} bytes of names and values exceed "
            f"server.max_path_bytes ({max_path_bytes})"
        )


def _path_problems(upstream: UpstreamConfig, path: str, max_path_bytes: int) -> Iterator[str]:
    size = len(path.encode())
    if size > max_path_bytes:
        yield f"http.path: {size} bytes exceed server.max_path_bytes ({max_path_bytes})"
        return
    problem = path_problem(path)
    if problem is not None:
        yield f"http.path {path!r} {problem}"
    elif upstream.path_prefixes and not path_allowed(path, upstream.path_prefixes):
        prefixes = ", ".join(upstream.path_prefixes)
        yield f"http.path {path!r} is outside upstreams.{upstream.name}.path_prefixes ({prefixes})"


def _header_problems(headers: Iterable[tuple[str, str]]) -> Iterator[str]:
    for name, value in headers:
        if name.lower() in FRAMING_HEADERS:
            yield f"http.headers: {name!r} is a hop-by-hop or framing header and is never sent"
        problem = header_value_problem(value)
        if problem is not None:
            yield f"http.headers[{name!r}]: {problem}"


def _metadata_problems(metadata: Iterable[tuple[str, str]]) -> Iterator[str]:
    for key, value in metadata:
        problem = header_value_problem(value, ascii_only=True)
        if problem is not None:
            yield f"grpc.metadata[{key!r}]: {problem}"


def _grpc_problems(upstream: UpstreamConfig, request: GrpcRequest) -> Iterator[str]:
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
