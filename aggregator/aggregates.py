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
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format, struct_pb2

from aggregator.composition import template_fields
from aggregator.config import AggregateConfig, Config, ConfigError
from aggregator.errors import InvalidRequest, Problem, TargetFailure
from aggregator.plan import Plan, PlannedTarget, make_plan
from aggregator.request import GrpcRequest, HttpRequest
from aggregator.security.outbound import plan_problems
from aggregator.substitution import (
    REFERENCE,
    Cap,
    Reference,
    Substitution,
    as_text,
    json_strings,
    path_segment,
    references,
    resolve,
)
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import PARAMS

_PREFIX = PARAMS + "."


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
    # Per target of the plan: how to fill its {{params...}} (None: it holds none).
    binders: tuple[_Binder | None, ...]
    max_params_bytes: int = 1024 * 1024

    def __repr__(self) -> str:
        return f"<NamedAggregate {self.name} [{len(self.plan.targets)} targets]>"

    @property
    def with_params(self) -> tuple[bool, ...]:
        return tuple(binder is not None for binder in self.binders)

    @property
    def still_templated(self) -> tuple[bool, ...]:
        """Per target: whether {{id.path}} references remain once parameters are filled."""
        return tuple(
            binder.templated if binder is not None else target.templated
            for binder, target in zip(self.binders, self.plan.targets, strict=True)
        )

    def bind(self, params: struct_pb2.Struct) -> Plan:
        """The plan of a call with ``params``; raises InvalidRequest naming each problem."""
        # Sized before anything reads them: no parameter may be larger than the largest
        # request of this aggregate's upstreams.
        size = params.ByteSize()
        if size > self.max_params_bytes:
            raise InvalidRequest(
                [Problem(None, "params", f"{size} bytes exceed the {self.max_params_bytes} that "
                         "the aggregate's upstreams accept (their max_request_bytes)")]
            )  # fmt: skip
        values = self._values(params)
        if not any(self.binders):
            return self.plan
        problems: list[Problem] = []
        targets = []
        for target, binder in zip(self.plan.targets, self.binders, strict=True):
            if binder is not None:
                try:
                    target = binder.bind(target, values, size)
                except TargetFailure as failure:
                    problems.append(Problem(target.id, "", failure.sentence))
                    continue
            targets.append(target)
        if problems:
            raise InvalidRequest(problems)
        plan = self.plan
        return Plan(tuple(targets), plan.max_targets, plan.max_path_bytes)

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
            try:
                values[name] = _python_value(value)
            except ValueError as problem:
                problems.append(f"params.{name}: {problem}")
        if problems:
            raise InvalidRequest(problems)
        return values


def _python_value(value: struct_pb2.Value) -> Any:
    """A parameter's value as Python (what substitution renders); ValueError when it cannot be
    one: null, or a string holding {{ (which would read as a reference once substituted)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        if "{{" in value.string_value:
            raise ValueError(_BRACES)
        return value.string_value
    if kind == "number_value":
        if not math.isfinite(value.number_value):  # as plan.py refuses them in a caller's JSON
            raise ValueError("NaN and Infinity are not JSON numbers")
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "null_value" or kind is None:
        raise ValueError("null is not a value (leave the parameter out for its default)")
    nested = json_format.MessageToDict(value)
    if any("{{" in text for text in json_strings(nested)):
        raise ValueError(_BRACES)
    return nested


_BRACES = "values may not contain {{ (references are the aggregate's own)"


def _lookup(values: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """``{{params.a.b}}``: values["a"]["b"]; TargetFailure when it is not there."""
    if len(path) == 1:  # every parameter is in values (bind checked), the usual case
        return values[path[0]]
    return resolve(Reference(PARAMS, path), lambda _: values)


class _Template:
    """A text with {{params...}} references, split once at load into literal text and
    references: filling it joins the parts, whatever {{id.path}} references it also holds."""

    __slots__ = ("_kept", "_parts", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        parts: list[str | tuple[str, tuple[str, ...]]] = []
        at = 0
        for match in REFERENCE.finditer(source):
            raw = match.group(1)
            if _is_param(raw):
                parts.append(source[at : match.start()])
                parts.append((raw, tuple(raw.split(".")[1:])))
                at = match.end()
        parts.append(source[at:])
        self._parts = tuple(parts)
        # The references left for the fan-out: a filled text must hold these and no other.
        self._kept = [raw for raw in references(source) if not _is_param(raw)]

    def __repr__(self) -> str:
        return f"<_Template {self.source!r}>"

    def fill(self, values: Mapping[str, Any], encode: Callable[[Any, str], str]) -> str:
        out: list[str] = []
        for part in self._parts:
            if isinstance(part, str):
                out.append(part)
            else:
                out.append(encode(_lookup(values, part[1]), part[0]))
        text = "".join(out)
        if "{{" in text and list(references(text)) != self._kept:
            raise TargetFailure(pb.OUTCOME_ERROR, "parameter values would make a {{...}} reference")
        return text


def _segment(value: Any, raw: str) -> str:
    """A value in a path: one whole segment, as substitution.py encodes a dependency's."""
    return path_segment(value if type(value) is str else as_text(value), raw)


def _text(value: Any, raw: str) -> str:
    return value if type(value) is str else as_text(value)


Field = str | _Template


def _field(text: str) -> Field:
    return _Template(text) if any(_is_param(raw) for raw in references(text)) else text


def _filled(field: Field, values: Mapping[str, Any], encode: Callable[[Any, str], str]) -> str:
    return field if isinstance(field, str) else field.fill(values, encode)


class _Binder:
    """Fills one target's {{params...}}: its templates split at load, the rest reused."""

    __slots__ = (
        "_header_params",
        "_headers",
        "_json",
        "_path",
        "_path_template",
        "_query",
        "_query_params",
        "templated",
    )  # fmt: skip

    def __init__(self, request: HttpRequest | GrpcRequest, templated: bool) -> None:
        self.templated = templated  # {{id.path}} references remain for the fan-out
        self._path: Field = request.path if isinstance(request, HttpRequest) else ""
        if isinstance(self._path, str):
            self._path = _field(self._path)
        # The admin page shows a bound path as configured: parameters are the caller's values.
        self._path_template = self._path.source if isinstance(self._path, _Template) else ""
        pairs = request.query if isinstance(request, HttpRequest) else ()
        self._query = tuple((name, _field(value)) for name, value in pairs)
        pairs = request.headers if isinstance(request, HttpRequest) else request.metadata
        self._headers = tuple((name, _field(value)) for name, value in pairs)
        self._query_params = any(isinstance(v, _Template) for _, v in self._query)
        self._header_params = any(isinstance(v, _Template) for _, v in self._headers)
        self._json = request.json_body is not None and any(
            _is_param(raw) for text in json_strings(request.json_body) for raw in references(text)
        )

    def __repr__(self) -> str:
        return f"<_Binder path={self._path!r}>"

    def bind(self, target: PlannedTarget, values: Mapping[str, Any], size: int) -> PlannedTarget:
        request = target.request
        bound: HttpRequest | GrpcRequest
        try:
            json_body = request.json_body
            if self._json:
                json_body = ParamSubstitution(values).json(json_body)
            if isinstance(request, HttpRequest):
                body = request.body
                if self._json:
                    body = json.dumps(json_body, separators=(",", ":")).encode()
                query, headers = request.query, request.headers
                if self._query_params:
                    query = tuple((name, _filled(v, values, _text)) for name, v in self._query)
                if self._header_params:
                    headers = tuple((name, _header(v, values)) for name, v in self._headers)
                path = self._path
                if not isinstance(path, str):
                    path = path.fill(values, _segment)
                bound = HttpRequest(
                    request.method, path, query, headers, body, json_body, self._path_template
                )
            else:
                metadata = request.metadata
                if self._header_params:
                    metadata = tuple((name, _header(v, values)) for name, v in self._headers)
                bound = GrpcRequest(
                    request.method,
                    request.request,
                    metadata,
                    json_body,
                    request.json_size + size if self._json else request.json_size,
                    request.schema,
                    request.unavailable,
                )
        except RecursionError:
            raise TargetFailure(pb.OUTCOME_ERROR, "a parameter is nested too deeply") from None
        t = target
        return PlannedTarget(
            t.id, t.upstream, bound, t.required, t.timeout, t.depends_on, t.fallback,
            t.decode_json, self.templated, t.for_each, t.index, t.item,
        )  # fmt: skip


def _header(field: Field, values: Mapping[str, Any]) -> str:
    """A header or metadata value (its characters are checked with the bound request)."""
    return field if isinstance(field, str) else field.fill(values, _text)


class ParamSubstitution(Substitution):
    """Replaces {{params...}} only in a JSON body, leaving {{id.path}} references for the
    fan-out (a whole reference keeps its value's type)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__((PARAMS,), lambda _: values)
        self._values = values

    def text(self, template: str, cap: Cap | None = None) -> str:
        return _Template(template).fill(self._values, _text) if "{{" in template else template

    def json(self, value: Any, cap: Cap | None = None) -> Any:
        if isinstance(value, str):
            whole = REFERENCE.fullmatch(value)
            if whole is not None and _is_param(whole.group(1)):
                return _lookup(self._values, tuple(whole.group(1).split(".")[1:]))
            return self.text(value)
        if isinstance(value, list):
            return [self.json(element) for element in value]
        if isinstance(value, dict):
            return {key: self.json(element) for key, element in value.items()}
        return value


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
        plan = make_plan(request, config, params=frozenset({PARAMS}))
    except InvalidRequest as invalid:
        own.extend(_at_key_paths(invalid.found, targets, path))
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
    binders = tuple(
        _Binder(planned.request, _holds_references(target)) if _holds_params(target) else None
        for planned, target in zip(plan.targets, targets, strict=True)
    )
    return NamedAggregate(
        name=aggregate.name,
        plan=plan,
        info=_info(aggregate, targets),
        defaults={p.name: p.default for p in aggregate.params.values() if not p.required},
        required=frozenset(p.name for p in aggregate.params.values() if p.required),
        binders=binders,
        max_params_bytes=max(
            config.server.max_path_bytes, *(t.upstream.max_request_bytes for t in plan.targets)
        ),
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


def _holds_references(target: pb.Target) -> bool:
    """Whether {{id.path}} references (not parameters) are in ``target``."""
    return any(
        not _is_param(raw) for _, text in _template_fields(target) for raw in references(text)
    )


def _holds_params(target: pb.Target) -> bool:
    return any(_is_param(raw) for _, text in _template_fields(target) for raw in references(text))


def _template_fields(target: pb.Target) -> Iterator[tuple[str, str]]:
    """(key path, text) of every field of ``target`` where a reference may stand (the
    planner's own walk, plus for_each)."""
    kind = target.WhichOneof("call")
    if kind is not None:
        yield from template_fields(target.http if kind == "http" else target.grpc)
    if target.for_each:
        yield "for_each", target.for_each


def _at_key_paths(
    problems: Iterable[Problem], targets: list[pb.Target], path: str
) -> Iterator[str]:
    """Each problem led by its key path in the config (its target by index, then its field)."""
    index_of: dict[str, int] = {}
    for index, target in enumerate(targets):
        index_of.setdefault(target.id, index)
    for problem in problems:
        if problem.target is None:  # about the request as a whole, or a target by index
            if problem.field.startswith("targets"):
                yield f"{path}.{problem}"
            else:
                yield f"{path}.targets: {problem}"
            continue
        index = index_of.get(problem.target, -1)
        where = f"{path}.targets[{index}]" if index >= 0 else f"{path}.targets"
        yield (
            f"{where}.{problem.field}: {problem.message}"
            if problem.field
            else (f"{where}: {problem.message}")
        )


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
