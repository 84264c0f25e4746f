"""What may reach an upstream: forwarded caller metadata, and the upstreams' rules applied to
every request that changed since it was planned.

The rules themselves are request.py's one table; this module walks it wherever a request is
final: after forwarded metadata is added or a named aggregate's parameters are bound
(``plan_problems``, for the targets not checked as they are), and after run-time substitution
of ``{{id.path}}`` references (``target_problems`` on the rendered request). Each problem is a
``Problem``, rendered as one sentence naming the target::

    target 'price': http.path: is outside upstreams.catalog.path_prefixes (/v1/)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from aggregator.config import ServerConfig, UpstreamConfig
from aggregator.errors import InvalidRequest, Problem
from aggregator.plan import Plan, PlannedTarget
from aggregator.request import GrpcRequest, HttpRequest, request_allowed, request_problems
from aggregator.security.fields import canonical_header
from aggregator.security.fields import path_allowed as path_allowed

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
        Problem(None, f"metadata {key!r}", "forwarded values may not contain {{ (references "
                "are the request's own)")
        for key, value in values.items()
        if "{{" in value
    ]  # fmt: skip
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
        changed: HttpRequest | GrpcRequest = replace(request, headers=request.headers + extra)
    else:
        changed = replace(request, metadata=request.metadata + extra)
    return replace(target, request=changed, checked=False)


def plan_problems(plan: Plan) -> list[Problem]:
    """Every rule broken by a target of ``plan`` not checked as it is (see ``target_problems``)."""
    return [
        problem
        for target in plan.targets
        if not target.checked
        for problem in target_problems(
            target.upstream, target.request, target.id, plan.max_path_bytes
        )
    ]


def target_problems(
    upstream: UpstreamConfig,
    request: HttpRequest | GrpcRequest,
    target_id: str,
    max_path_bytes: int = MAX_PATH_BYTES,
) -> list[Problem]:
    """What in ``request`` upstream ``upstream`` does not accept; empty when it may be sent."""
    if request_allowed(upstream, request, max_path_bytes):
        return []
    return list(request_problems(upstream, request, target_id, max_path_bytes))


def _pairs(request: HttpRequest | GrpcRequest) -> tuple[tuple[str, str], ...]:
    return request.headers if isinstance(request, HttpRequest) else request.metadata
