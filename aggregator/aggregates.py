"""Named aggregates (config ``aggregates``): planned once at load, bound to parameters per call.

A ``Catalog`` plans every configured aggregate when the config loads, exactly as a request naming
its targets would be planned (plan.py, then the upstreams' rules in security/outbound.py), and
reports each problem with its key path::

    aggregates.product_page.targets[1].http.path: '/a/../b' is not a normalized path

A call then only binds its parameters (``NamedAggregate.bind``): ``{{params.NAME}}`` is replaced
in the targets that hold it, with the same encodings as a dependency's value (a path segment is
percent-encoded whole, so ``/``, ``?``, ``#`` stay inside it and ``.``/``..`` are refused; a
header value passes the same checks as one the caller set). A value that cannot stand where it
lands, a missing required parameter or an undeclared one is INVALID_ARGUMENT, and nothing is sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf import json_format, struct_pb2

from aggregator.config import PARAMS, AggregateConfig, Config, ConfigError
from aggregator.errors import InvalidRequest, TargetFailure
from aggregator.plan import GrpcRequest, HttpRequest, Plan, PlannedTarget, explained_plan
from aggregator.security.outbound import plan_problems
from aggregator.substitution import (
    REFERENCE,
    Reference,
    Substitution,
    as_text,
    json_strings,
    references,
    resolve,
)
from aggregator.v1 import aggregator_pb2 as pb

_PREFIX = PARAMS + "."
# A problem as plan.py words it: about one target (by id, or by index when the id is unusable).
_LABELLED = re.compile(r"^(?:target '([^']*)'|targets\[(\d+)\]): (.*)\Z", re.DOTALL)
# ... and the field it is about, if it starts with one: "http.path: ...", "http.headers['x'] ...".
_FIELD = re.compile(
    r"^((?:http|grpc|timeout|depends_on|for_each|fallback|id)(?:[.A-Za-z0-9_]*)"
    r"(?:\[[^\]]*\])?):?\s(.*)\Z",
    re.DOTALL,
)


def _is_param(raw: str) -> bool:
    return raw == PARAMS or raw.startswith(_PREFIX)


@dataclass(frozen=True, slots=True)
class NamedAggregate:
    """One configured aggregate, planned. ``bind`` makes the plan of one call."""

    name: str
    plan: Plan
    info: pb.AggregateInfo
    defaults: Mapping[str, Any]  # optional parameters' values
    required: frozenset[str]
    # Per target of the plan: whether it holds {{params...}}, and whether it still holds
    # {{id.path}} references once they are replaced (then the fan-out renders those).
    with_params: tuple[bool, ...]
    still_templated: tuple[bool, ...]

    def __repr__(self) -> str:
        return f"<NamedAggregate {self.name} [{len(self.plan.targets)} targets]>"

    def bind(self, params: struct_pb2.Struct) -> Plan:
        """The plan of a call with ``params``; raises InvalidRequest naming each problem."""
        values = self._values(params)
        if not any(self.with_params):
            return self.plan
        size = params.ByteSize()
        problems: list[str] = []
        targets = []
        for target, has_params, templated in zip(
            self.plan.targets, self.with_params, self.still_templated, strict=True
        ):
            if has_params:
                try:
                    target = _bound(target, values, templated, size)
                except TargetFailure as failure:
                    problems.append(f"target {target.id!r}: {failure.sentence}")
                    continue
            targets.append(target)
        if problems:
            raise InvalidRequest(problems)
        return replace(self.plan, targets=tuple(targets))

    def _values(self, params: struct_pb2.Struct) -> dict[str, Any]:
        fields = params.fields
        problems = [
            f"params.{name}: aggregate {self.name!r} declares no such parameter"
            for name in fields
            if name not in self.defaults and name not in self.required
        ]
        problems.extend(
            f"params.{name}: required by aggregate {self.name!r}"
            for name in sorted(self.required)
            if name not in fields
        )
        if problems:
            raise InvalidRequest(problems)
        values = dict(self.defaults)
        for name, value in fields.items():
            values[name] = json_format.MessageToDict(value)
            problem = _value_problem(value)
            if problem:
                problems.append(f"params.{name}: {problem}")
        if problems:
            raise InvalidRequest(problems)
        return values


def _value_problem(value: struct_pb2.Value) -> str | None:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return None if "{{" not in value.string_value else _BRACES
    if kind == "null_value" or kind is None:
        return "null is not a value (leave the parameter out for its default)"
    nested = kind in ("struct_value", "list_value")
    if nested and any("{{" in text for text in json_strings(json_format.MessageToDict(value))):
        return _BRACES
    return None


_BRACES = "values may not contain {{ (references are the aggregate's own)"


class ParamSubstitution(Substitution):
    """Replaces {{params...}} only, leaving {{id.path}} references for the fan-out."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__((PARAMS,), lambda _: values)
        self._values = values

    def _param(self, raw: str) -> Any:
        return resolve(Reference(PARAMS, tuple(raw.split(".")[1:])), lambda _: self._values)

    def text(self, template: str) -> str:
        if "{{" not in template:
            return template

        def value(match: re.Match[str]) -> str:
            raw = match.group(1)
            return as_text(self._param(raw)) if _is_param(raw) else match.group(0)

        return _unchanged_references(template, REFERENCE.sub(value, template))

    def path(self, template: str) -> str:
        if "{{" not in template:
            return template
        outer = Substitution((PARAMS,), lambda _: self._values)

        def segment(match: re.Match[str]) -> str:
            if not _is_param(match.group(1)):
                return match.group(0)
            return outer.path(match.group(0))

        return _unchanged_references(template, REFERENCE.sub(segment, template))

    def json(self, value: Any) -> Any:
        if isinstance(value, str):
            whole = REFERENCE.fullmatch(value)
            if whole is not None and _is_param(whole.group(1)):
                return self._param(whole.group(1))
            return self.text(value)
        if isinstance(value, list):
            return [self.json(element) for element in value]
        if isinstance(value, dict):
            return {key: self.json(element) for key, element in value.items()}
        return value


def _unchanged_references(template: str, rendered: str) -> str:
    """``rendered``, unless the values put in it made a {{...}} reference the template did not
    have (a value ending in ``{`` before one starting with ``{``)."""
    if "{{" in rendered:
        kept = [raw for raw in references(template) if not _is_param(raw)]
        if list(references(rendered)) != kept:
            raise TargetFailure(pb.OUTCOME_ERROR, "parameter values would make a {{...}} reference")
    return rendered


def _bound(target: PlannedTarget, values: Mapping[str, Any], templated: bool, size: int) -> Any:
    substitution = ParamSubstitution(values)
    request = target.request
    bound: HttpRequest | GrpcRequest
    try:
        if isinstance(request, HttpRequest):
            json_body = (
                substitution.json(request.json_body) if request.json_body is not None else None
            )
            body = request.body
            if json_body is not None:
                body = json.dumps(json_body, separators=(",", ":")).encode()
            bound = replace(
                request,
                path=substitution.path(request.path),
                query=tuple((k, substitution.text(v)) for k, v in request.query),
                headers=tuple((k, substitution.header(v)) for k, v in request.headers),
                body=body,
                json_body=json_body,
            )
        else:
            bound = replace(
                request,
                json_body=(
                    substitution.json(request.json_body) if request.json_body is not None else None
                ),
                json_size=request.json_size + size if request.json_body is not None else 0,
                metadata=tuple((k, substitution.metadata(v)) for k, v in request.metadata),
            )
    except RecursionError:
        raise TargetFailure(pb.OUTCOME_ERROR, "a parameter is nested too deeply") from None
    return replace(target, request=bound, templated=templated)


class Catalog:
    """Every named aggregate of a config, planned; raises ConfigError listing every problem."""

    def __init__(self, config: Config) -> None:
        problems: list[str] = []
        warnings: list[str] = []
        self._by_name: dict[str, NamedAggregate] = {}
        for name, aggregate in config.aggregates.items():
            named = _planned(aggregate, config, problems, warnings)
            if named is not None:
                self._by_name[name] = named
        if problems:
            raise ConfigError(problems)
        self.warnings = tuple(warnings)

    def __repr__(self) -> str:
        return f"<Catalog [{', '.join(self._by_name)}]>"

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> NamedAggregate | None:
        return self._by_name.get(name)

    def infos(self, may_run: Callable[[str], bool]) -> pb.ListAggregatesResponse:
        return pb.ListAggregatesResponse(
            aggregates=[named.info for name, named in self._by_name.items() if may_run(name)]
        )


def _planned(
    aggregate: AggregateConfig, config: Config, problems: list[str], warnings: list[str]
) -> NamedAggregate | None:
    path = f"aggregates.{aggregate.name}"
    targets = []
    own: list[str] = []
    for index, raw in enumerate(aggregate.targets):
        try:
            targets.append(json_format.ParseDict(dict(raw), pb.Target()))
        except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
            own.append(f"{path}.targets[{index}]: not a Target: {' '.join(str(exc).split())}")
    if own:  # the rest cannot be checked on a part of the targets
        problems.extend(own)
        return None
    declared = frozenset(aggregate.params)
    used: set[str] = set()
    for index, target in enumerate(targets):
        where = f"{path}.targets[{index}]"
        if target.id == PARAMS:
            own.append(f"{where}.id: {PARAMS!r} is where a named aggregate's parameters are")
        for key, text in _template_fields(target):
            for found in references(text):
                if _is_param(found):
                    own.extend(_param_reference_problems(found, declared, f"{where}.{key}", used))
    request = pb.AggregateRequest(targets=targets)
    try:
        plan = explained_plan(request, config, params=frozenset({PARAMS}))
    except InvalidRequest as invalid:
        own.extend(_at_key_paths(invalid.problems, targets, path))
        plan = None
    if plan is not None:
        own.extend(_at_key_paths(plan_problems(plan), targets, path))
    problems.extend(own)
    warnings.extend(
        f"{path}.params.{name}: declared but no target uses {{{{params.{name}}}}}"
        for name in aggregate.params
        if name not in used
    )
    if own or plan is None:
        return None
    with_params = tuple(_holds_params(target) for target in targets)
    still = tuple(
        any(not _is_param(raw) for _, text in _template_fields(t) for raw in references(text))
        for t in targets
    )
    return NamedAggregate(
        name=aggregate.name,
        plan=plan,
        info=_info(aggregate, targets),
        defaults={p.name: p.default for p in aggregate.params.values() if not p.required},
        required=frozenset(p.name for p in aggregate.params.values() if p.required),
        with_params=with_params,
        still_templated=still,
    )


def _param_reference_problems(
    raw: str, declared: frozenset[str], where: str, used: set[str]
) -> Iterator[str]:
    name = raw[len(_PREFIX) :].split(".")[0] if raw.startswith(_PREFIX) else ""
    if not name:
        yield f"{where}: {{{{{raw}}}}} names no parameter (use {{{{params.NAME}}}})"
    elif name not in declared:
        listed = ", ".join(sorted(declared)) or "none"
        yield f"{where}: {{{{{raw}}}}} names undeclared parameter {name!r} (declared: {listed})"
    else:
        used.add(name)


def _holds_params(target: pb.Target) -> bool:
    return any(_is_param(raw) for _, text in _template_fields(target) for raw in references(text))


def _template_fields(target: pb.Target) -> Iterator[tuple[str, str]]:
    """(key path, text) of every field of ``target`` where a reference may stand."""
    kind = target.WhichOneof("call")
    if kind == "http":
        call = target.http
        yield "http.path", call.path
        yield from ((f"http.query.{k}", v) for k, v in call.query.items())
        yield from ((f"http.headers.{k}", v) for k, v in call.headers.items())
        if call.WhichOneof("payload") == "json":
            yield from (("http.json", v) for v in _strings_of(call.json))
    elif kind == "grpc":
        yield from ((f"grpc.metadata.{k}", v) for k, v in target.grpc.metadata.items())
        if target.grpc.HasField("json"):
            yield from (("grpc.json", v) for v in _strings_of(target.grpc.json))
    if target.for_each:
        yield "for_each", target.for_each


def _strings_of(value: struct_pb2.Value) -> Iterable[str]:
    try:
        return list(json_strings(json_format.MessageToDict(value)))
    except ValueError:  # NaN or Infinity: plan.py says so
        return []


def _at_key_paths(problems: Iterable[str], targets: list[pb.Target], path: str) -> Iterator[str]:
    """plan.py's and outbound.py's sentences, each led by its key path in the config."""
    index_of: dict[str, int] = {}
    for index, target in enumerate(targets):
        index_of.setdefault(target.id, index)
    for problem in problems:
        labelled = _LABELLED.match(problem)
        if labelled is None:
            field = problem.split(":", 1)[0]
            if field.startswith("targets"):
                yield f"{path}.{problem}"
            else:
                yield f"{path}.targets: {problem}"
            continue
        target_id, number, rest = labelled.groups()
        index = int(number) if number is not None else index_of.get(target_id or "", -1)
        where = f"{path}.targets[{index}]" if index >= 0 else f"{path}.targets"
        field_match = _FIELD.match(rest)
        if field_match is not None:
            yield f"{where}.{field_match.group(1)}: {field_match.group(2)}"
        else:
            yield f"{where}: {rest}"


def _info(aggregate: AggregateConfig, targets: list[pb.Target]) -> pb.AggregateInfo:
    info = pb.AggregateInfo(
        name=aggregate.name,
        description=aggregate.description,
        target_ids=[target.id for target in targets],
    )
    for param in aggregate.params.values():
        entry = info.params.add(name=param.name, required=param.required)
        if not param.required:
            json_format.ParseDict(param.default, entry.default)
    return info
