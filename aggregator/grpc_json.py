"""gRPC targets in JSON: each gets its method's schema before anything is sent.

``typed_plan`` runs between the plan and the fan-out, for the gRPC targets that need their
upstream's descriptors: a ``json`` request (encoded here, or when the target starts if it holds
``{{...}}`` references), ``decode_json``, or an answer that later targets read. A request that
does not fit its method, or a method the upstream does not have, is INVALID_ARGUMENT naming the
target, and nothing is sent; an upstream whose descriptors cannot be had fails only the targets
whose ``json`` needs them (OUTCOME_UNAVAILABLE when they start).

Large JSON requests are encoded off the event loop (aggregator/offload.py); answers are decoded
with every other body, once each (aggregator/decoding.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import replace

from aggregator.errors import InvalidRequest, TargetFailure
from aggregator.offload import Offload, OffloadBusy
from aggregator.plan import Plan, PlannedTarget
from aggregator.request import GrpcRequest
from aggregator.schema import MAPPING_COST, JsonMismatch, MethodSchema
from aggregator.security.outbound import target_problems
from aggregator.upstreams.descriptors import Descriptors, DescriptorsUnavailable, UnknownMethod
from aggregator.v1 import aggregator_pb2 as pb

Lookup = MethodSchema | DescriptorsUnavailable | UnknownMethod


async def typed_plan(
    plan: Plan, descriptors: Mapping[str, Descriptors], stop_at: float, offload: Offload
) -> Plan:
    """``plan`` with its gRPC targets' schemas and encoded JSON requests; raises
    InvalidRequest listing every request that does not fit and every unknown method."""
    wanted = _wanting_schemas(plan.targets)
    if not wanted:
        return plan
    # Known methods without awaiting (the common case); the others looked up at once.
    found: list[Lookup | None] = [_cached(target, descriptors) for target in wanted]
    missing = [index for index, lookup in enumerate(found) if lookup is None]
    if missing:
        looked_up = await asyncio.gather(
            *(
                _lookup(wanted[i], descriptors.get(wanted[i].upstream.name), stop_at, offload)
                for i in missing
            )
        )
        for index, answer in zip(missing, looked_up, strict=True):
            found[index] = answer
    typed: dict[str, PlannedTarget] = {}
    problems: list[str] = []
    for target, known in zip(wanted, found, strict=True):
        assert known is not None
        try:
            typed[target.id] = await _typed(target, known, offload)
        except InvalidRequest as invalid:
            problems.extend(invalid.problems)
    if problems:
        raise InvalidRequest(problems)
    return replace(plan, targets=tuple(typed.get(t.id, t) for t in plan.targets))


def _wanting_schemas(targets: Sequence[PlannedTarget]) -> list[PlannedTarget]:
    """The gRPC targets whose method's schema is needed (a cheap pass for other plans)."""
    read: set[str] | None = None
    wanted = []
    for target in targets:
        request = target.request
        if not isinstance(request, GrpcRequest):
            continue
        if request.json_body is None and not target.decode_json:
            if read is None:  # answers that {{...}} or for_each of later targets read
                read = {dep for t in targets if t.templated or t.for_each for dep in t.depends_on}
            if target.id not in read:
                continue
        wanted.append(target)
    return wanted


def _cached(target: PlannedTarget, descriptors: Mapping[str, Descriptors]) -> Lookup | None:
    assert isinstance(target.request, GrpcRequest)
    known = descriptors.get(target.upstream.name)
    return known.cached(target.request.method) if known is not None else None


async def _lookup(
    target: PlannedTarget, descriptors: Descriptors | None, stop_at: float, offload: Offload
) -> Lookup:
    assert isinstance(target.request, GrpcRequest)
    if descriptors is None:
        return DescriptorsUnavailable(f"upstream {target.upstream.name!r} has no descriptors")
    wait = min(target.upstream.timeout, stop_at - asyncio.get_running_loop().time())
    try:
        return await descriptors.method(target.request.method, wait, offload)
    except (DescriptorsUnavailable, UnknownMethod) as failure:
        return failure


async def _typed(target: PlannedTarget, lookup: Lookup, offload: Offload) -> PlannedTarget:
    request = target.request
    assert isinstance(request, GrpcRequest)
    if request.json_body is None:  # only read: without descriptors, the bytes still go
        return (
            replace(target, request=replace(request, schema=lookup))
            if isinstance(lookup, MethodSchema)
            else target
        )
    label = f"target {target.id!r}"
    if isinstance(lookup, UnknownMethod):
        raise InvalidRequest([f"{label}: grpc.method: {lookup}"])
    if isinstance(lookup, DescriptorsUnavailable):
        return replace(target, request=replace(request, unavailable=str(lookup)))
    request = replace(request, schema=lookup)
    if target.templated:  # encoded when it starts, once its references are resolved
        return replace(target, request=request)
    try:
        request = await encoded(request, offload)
    except JsonMismatch as mismatch:
        raise InvalidRequest([f"{label}: {_misfit_sentence(lookup, mismatch)}"]) from None
    except OffloadBusy as busy:  # said when it starts, as for descriptors that cannot be had
        return replace(target, request=replace(request, unavailable=str(busy)))
    problems = target_problems(target.upstream, request, target.id)
    if problems:
        raise InvalidRequest(problems)
    return replace(target, request=request)


async def encoded(request: GrpcRequest, offload: Offload, size: int | None = None) -> GrpcRequest:
    """``request`` with its JSON encoded as the method's input message (off the loop when
    large: ``size`` bounds its size, json_size when not given); raises JsonMismatch or
    OffloadBusy."""
    schema = request.schema
    assert schema is not None
    assert request.json_body is not None
    weight = (request.json_size if size is None else size) * MAPPING_COST
    data = await offload.run(weight, schema.encode, request.json_body)
    return replace(request, request=data, json_body=None)


async def rendered_request(request: GrpcRequest, size: int, offload: Offload) -> GrpcRequest:
    """A substituted JSON request encoded when its target starts (``size``: a bound on its
    JSON's size); TargetFailure(ERROR) when the values it received make it not fit."""
    if request.unavailable:
        raise TargetFailure(pb.OUTCOME_UNAVAILABLE, request.unavailable)
    if request.json_body is None:
        return request
    if request.schema is None:
        raise TargetFailure(pb.OUTCOME_UNAVAILABLE, "the upstream's descriptors were not looked up")
    try:
        return await encoded(request, offload, size)
    except JsonMismatch as mismatch:
        raise TargetFailure(pb.OUTCOME_ERROR, _misfit_sentence(request.schema, mismatch)) from None
    except OffloadBusy as busy:
        raise TargetFailure(pb.OUTCOME_UNAVAILABLE, str(busy)) from None


def _misfit_sentence(schema: MethodSchema, mismatch: JsonMismatch) -> str:
    """Names the message, the field path and the type expected; never a value (docs/security.md)."""
    return f"grpc.json does not fit {schema.input_type.full_name}: {mismatch}"
