"""Composition in a request: ``depends_on`` graphs and ``{{id.path}}`` references, checked when
the plan is made (plan.py), with the walk over every text a reference may stand in that
named aggregates (aggregates.py) use too. What can multiply is capped per target:
``MAX_DEPENDS_ON`` entries in ``depends_on`` and ``MAX_REFERENCES`` references.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Collection, Iterator, Mapping, Sequence

from google.protobuf import struct_pb2

from aggregator.errors import Problem
from aggregator.request import GrpcRequest, HttpRequest
from aggregator.substitution import Sources, json_strings, references
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import ITEM, NAME

# Caps per target, so no part of planning or running a target grows with the product of two
# parts of the request (references x sources, entries x entries).
MAX_DEPENDS_ON = 64
MAX_REFERENCES = 256

Call = pb.HttpCall | pb.GrpcCall


def dependency_problems(targets: Sequence[pb.Target]) -> Iterator[Problem]:
    graph: dict[str, list[str]] = {}
    for target in targets:
        if len(target.depends_on) > MAX_DEPENDS_ON:  # refused as it is: look no further
            graph[target.id] = []
            continue
        counts = collections.Counter(target.depends_on)  # in order of first appearance
        repeated = [dep for dep, count in counts.items() if count > 1]
        if repeated:
            listed = ", ".join(map(repr, repeated[:5])) + (" ..." if len(repeated) > 5 else "")
            yield Problem(target.id, "depends_on", f"names {listed} more than once")
        graph[target.id] = list(counts)
    for target_id, deps in graph.items():
        for dep in deps:
            if dep == target_id:
                yield Problem(target_id, "depends_on", "names itself")
            elif dep not in graph:
                yield Problem(target_id, "depends_on", f"names unknown target {dep!r}")
    cycle = _find_cycle(graph)
    if cycle:
        shown = " -> ".join(i if NAME.match(i) else repr(i) for i in cycle)
        yield Problem(None, "depends_on", f"cycle {shown}")


def template_problems(
    target: pb.Target,
    call: Call | None,
    expanding: Collection[str],
    params: frozenset[str] = frozenset(),
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
    found = _references(call) if call is not None else []
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


def _references(call: Call) -> list[str]:
    """The call's references, at most one more than MAX_REFERENCES."""
    found: list[str] = []
    for text in _template_texts(call):
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


def _template_texts(call: Call) -> Iterator[str]:
    """The texts of a call where a {{...}} reference may stand."""
    if isinstance(call, pb.GrpcCall):
        yield from call.metadata.values()
        if call.HasField("json"):
            yield from _json_texts(call.json)
        return
    yield call.path
    yield from call.query.values()
    yield from call.headers.values()
    if call.WhichOneof("payload") == "json":
        yield from _json_texts(call.json)


def templated(request: HttpRequest | GrpcRequest) -> bool:
    """Whether a {{ stands in any text of ``request`` (loops over tuples: most have none)."""
    if isinstance(request, HttpRequest):
        if "{{" in request.path:
            return True
        for _, value in request.query:
            if "{{" in value:
                return True
        pairs = request.headers
    else:
        pairs = request.metadata
    for _, value in pairs:
        if "{{" in value:
            return True
    json_body = request.json_body
    return json_body is not None and any("{{" in text for text in json_strings(json_body))


def template_fields(call: Call) -> Iterator[tuple[str, str]]:
    """(field, text) of every text of ``call`` where a reference may stand: the same walk as
    the planner's, with the field each text is in (aggregates.py names it in key paths)."""
    if isinstance(call, pb.GrpcCall):
        yield from ((f"grpc.metadata.{k}", v) for k, v in call.metadata.items())
        if call.HasField("json"):
            yield from (("grpc.json", v) for v in _json_texts(call.json))
        return
    yield "http.path", call.path
    yield from ((f"http.query.{k}", v) for k, v in call.query.items())
    yield from ((f"http.headers.{k}", v) for k, v in call.headers.items())
    if call.WhichOneof("payload") == "json":
        yield from (("http.json", v) for v in _json_texts(call.json))


def _json_texts(value: struct_pb2.Value) -> Iterator[str]:
    """The strings of a JSON payload, read without converting it."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = item.WhichOneof("kind")
        if kind == "string_value":
            yield item.string_value
        elif kind == "list_value":
            stack.extend(item.list_value.values)
        elif kind == "struct_value":
            stack.extend(item.struct_value.fields.values())


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
