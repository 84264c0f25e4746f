"""The compiled codecs (aggregator/codecs.py) against json_format, on a schema with every field
kind: decode equals json_format.MessageToDict (its value, or its exception), encode equals
ParseDict + SerializeToString (its bytes, or the same JsonMismatch text), for generated messages
and for generated documents json_format accepts and refuses."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    json_format,
    message_factory,
    struct_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.codecs import Codec
from aggregator.schema import JsonMismatch, MethodSchema, Schema

_T = descriptor_pb2.FieldDescriptorProto
_WKT = (any_pb2, duration_pb2, empty_pb2, field_mask_pb2, struct_pb2, timestamp_pb2, wrappers_pb2)
_SCALARS = {
    "double": _T.TYPE_DOUBLE, "float": _T.TYPE_FLOAT, "int32": _T.TYPE_INT32,
    "int64": _T.TYPE_INT64, "uint32": _T.TYPE_UINT32, "uint64": _T.TYPE_UINT64,
    "sint32": _T.TYPE_SINT32, "sint64": _T.TYPE_SINT64, "fixed32": _T.TYPE_FIXED32,
    "fixed64": _T.TYPE_FIXED64, "sfixed32": _T.TYPE_SFIXED32, "sfixed64": _T.TYPE_SFIXED64,
    "bool": _T.TYPE_BOOL, "string": _T.TYPE_STRING, "bytes": _T.TYPE_BYTES,
}  # fmt: skip
_WRAPPED = ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
_MESSAGES = {
    "nested": ".codec.v1.Nested", "ts": ".google.protobuf.Timestamp",
    "dur": ".google.protobuf.Duration", "mask": ".google.protobuf.FieldMask",
    "st": ".google.protobuf.Struct", "val": ".google.protobuf.Value",
    "lv": ".google.protobuf.ListValue", "any": ".google.protobuf.Any",
    "empty": ".google.protobuf.Empty", "child": ".codec.v1.Rich",
    "legacy": ".codec.v1.Legacy",
    **{f"w_{kind.lower()}": f".google.protobuf.{kind}Value" for kind in _WRAPPED},
}  # fmt: skip


def _rich_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="codec/v1/rich.proto",
        package="codec.v1",
        syntax="proto3",
        dependency=[module.DESCRIPTOR.name for module in _WKT] + ["codec/v1/legacy.proto"],
    )
    color = file.enum_type.add(name="Color")
    for number, name in enumerate(("COLOR_UNSPECIFIED", "COLOR_RED", "COLOR_BLUE")):
        color.value.add(name=name, number=number)
    nested = file.message_type.add(name="Nested")
    _add(nested, "name", _T.TYPE_STRING)
    _add(nested, "count", _T.TYPE_INT64)
    _add(nested, "color", _T.TYPE_ENUM, ".codec.v1.Color")
    _add(nested, "ratio", _T.TYPE_FLOAT)
    rich = file.message_type.add(name="Rich")
    for kind, type_ in _SCALARS.items():
        _add(rich, f"f_{kind}", type_)
        _add(rich, f"r_{kind}", type_, repeated=True)
    _add(rich, "f_enum", _T.TYPE_ENUM, ".codec.v1.Color")
    _add(rich, "r_enum", _T.TYPE_ENUM, ".codec.v1.Color", repeated=True)
    for name, type_name in _MESSAGES.items():
        _add(rich, name, _T.TYPE_MESSAGE, type_name)
    _add(rich, "r_nested", _T.TYPE_MESSAGE, ".codec.v1.Nested", repeated=True)
    _add(rich, "r_ts", _T.TYPE_MESSAGE, ".google.protobuf.Timestamp", repeated=True)
    _add(rich, "r_w_int64", _T.TYPE_MESSAGE, ".google.protobuf.Int64Value", repeated=True)
    for name, key, value, type_name in (
        ("m_str_int64", _T.TYPE_STRING, _T.TYPE_INT64, ""),
        ("m_int32_nested", _T.TYPE_INT32, _T.TYPE_MESSAGE, ".codec.v1.Nested"),
        ("m_bool_str", _T.TYPE_BOOL, _T.TYPE_STRING, ""),
        ("m_uint64_enum", _T.TYPE_UINT64, _T.TYPE_ENUM, ".codec.v1.Color"),
        ("m_str_double", _T.TYPE_STRING, _T.TYPE_DOUBLE, ""),
    ):
        _map(rich, name, key, value, type_name)
    rich.oneof_decl.add(name="choice")
    for name, type_, type_name in (
        ("o_string", _T.TYPE_STRING, ""),
        ("o_nested", _T.TYPE_MESSAGE, ".codec.v1.Nested"),
        ("o_int64", _T.TYPE_INT64, ""),
    ):
        _add(rich, name, type_, type_name, oneof=0)
    for name, type_ in (("opt_int32", _T.TYPE_INT32), ("opt_string", _T.TYPE_STRING)):
        rich.oneof_decl.add(name=f"_{name}")
        _add(rich, name, type_, oneof=len(rich.oneof_decl) - 1, proto3_optional=True)
    service = file.service.add(name="Codecs")
    for name, input_type, output_type in (
        ("Rich", ".codec.v1.Rich", ".codec.v1.Rich"),
        ("Legacy", ".codec.v1.Legacy", ".codec.v1.Legacy"),
        ("Stamp", ".google.protobuf.Timestamp", ".google.protobuf.Struct"),
        ("Wrapped", ".google.protobuf.Int64Value", ".google.protobuf.Value"),
    ):
        service.method.add(name=name, input_type=input_type, output_type=output_type)
    return file


def _legacy_file() -> descriptor_pb2.FileDescriptorProto:
    """proto2: presence for every field, defaults, a closed enum."""
    file = descriptor_pb2.FileDescriptorProto(
        name="codec/v1/legacy.proto", package="codec.v1", syntax="proto2"
    )
    shade = file.enum_type.add(name="Shade")
    for number, name in ((1, "SHADE_LIGHT"), (2, "SHADE_DARK")):
        shade.value.add(name=name, number=number)
    legacy = file.message_type.add(name="Legacy")
    _add(legacy, "level", _T.TYPE_INT32).default_value = "7"
    _add(legacy, "shade", _T.TYPE_ENUM, ".codec.v1.Shade")
    _add(legacy, "label", _T.TYPE_STRING).default_value = "none"
    _add(legacy, "weights", _T.TYPE_DOUBLE, repeated=True)
    return file


def _add(
    message: Any,
    name: str,
    type_: int,
    type_name: str = "",
    repeated: bool = False,
    oneof: int | None = None,
    proto3_optional: bool = False,
) -> Any:
    field = message.field.add(
        name=name,
        number=len(message.field) + 1,
        type=type_,
        label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL,
    )
    if type_name:
        field.type_name = type_name
    if oneof is not None:
        field.oneof_index = oneof
    if proto3_optional:
        field.proto3_optional = True
    return field


def _map(message: Any, name: str, key: int, value: int, type_name: str) -> None:
    entry_name = "".join(part.title() for part in name.split("_")) + "Entry"
    entry = message.nested_type.add(name=entry_name)
    entry.options.map_entry = True
    _add(entry, "key", key)
    _add(entry, "value", value, type_name)
    _add(message, name, _T.TYPE_MESSAGE, f".codec.v1.Rich.{entry_name}", repeated=True)


def _schema() -> Schema:
    files = [_legacy_file(), _rich_file()]
    for module in _WKT:
        file = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file)
        files.append(file)
    schema = Schema(files, origin="test")
    assert not schema.broken
    return schema


SCHEMA = _schema()
RICH = SCHEMA.find("/codec.v1.Codecs/Rich")
LEGACY = SCHEMA.find("/codec.v1.Codecs/Legacy")
STAMP = SCHEMA.find("/codec.v1.Codecs/Stamp")
WRAPPED = SCHEMA.find("/codec.v1.Codecs/Wrapped")
assert RICH
assert LEGACY
assert STAMP
assert WRAPPED
METHODS = (RICH, LEGACY, STAMP, WRAPPED)
# Generated examples, bounded so the file runs in seconds.
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- generated messages ---

_INT_RANGES = {
    _T.TYPE_INT32: 31, _T.TYPE_SINT32: 31, _T.TYPE_SFIXED32: 31,
    _T.TYPE_INT64: 63, _T.TYPE_SINT64: 63, _T.TYPE_SFIXED64: 63,
}  # fmt: skip
_UINT_RANGES = {_T.TYPE_UINT32: 32, _T.TYPE_FIXED32: 32, _T.TYPE_UINT64: 64, _T.TYPE_FIXED64: 64}
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.integers(-(2**70), 2**70),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8,
)  # fmt: skip


def _scalar(field: Any) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        bits = _INT_RANGES[field.type]
        return st.integers(-(2**bits), 2**bits - 1)
    if field.type in _UINT_RANGES:
        return st.integers(0, 2 ** _UINT_RANGES[field.type] - 1)
    if field.type == _T.TYPE_DOUBLE:
        return st.floats()
    if field.type == _T.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == _T.TYPE_BOOL:
        return st.booleans()
    if field.type == _T.TYPE_STRING:
        return st.text(max_size=6)
    if field.type == _T.TYPE_BYTES:
        return st.binary(max_size=6)
    numbers = [value.number for value in field.enum_type.values]
    unknown = [] if field.enum_type.is_closed else [7, -3]
    return st.sampled_from(numbers + unknown)


@st.composite
def messages(draw: st.DrawFn, descriptor: Any, depth: int = 3, sparse: bool = False) -> Any:
    """A message of ``descriptor`` with a random subset of its fields set (few if
    ``sparse``)."""
    cls = _class(descriptor)
    message = cls()
    full_name = descriptor.full_name
    if full_name in _SPECIAL:
        return draw(_SPECIAL[full_name](message))
    for field in descriptor.fields:
        if draw(st.integers(0, 9)) >= (1 if sparse else 5):
            continue
        if field.message_type is not None and depth <= 0:
            continue
        _set(draw, message, field, depth)
    return message


def _set(draw: st.DrawFn, message: Any, field: Any, depth: int) -> None:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        container = getattr(message, field.name)
        for key in draw(st.lists(_scalar(key_field), max_size=3)):
            if value_field.message_type is not None:
                container[key].CopyFrom(draw(messages(value_field.message_type, depth - 1)))
            else:
                container[key] = draw(_scalar(value_field))
        return
    if field.is_repeated:
        container = getattr(message, field.name)
        if field.message_type is not None:
            for item in draw(st.lists(messages(field.message_type, depth - 1), max_size=3)):
                container.add().CopyFrom(item)
        else:
            container.extend(draw(st.lists(_scalar(field), max_size=3)))
        return
    if field.message_type is not None:
        getattr(message, field.name).CopyFrom(draw(messages(field.message_type, depth - 1)))
    else:
        setattr(message, field.name, draw(_scalar(field)))


def _class(descriptor: Any) -> Any:
    return message_factory.GetMessageClass(descriptor)


@st.composite
def _timestamp(draw: st.DrawFn, message: Any) -> Any:
    message.seconds = draw(st.integers(-62135596800 - 2, 253402300799 + 2))
    message.nanos = draw(st.sampled_from([0, 5, 1000, 2_000_000, 999_999_999, -1]))
    return message


@st.composite
def _duration(draw: st.DrawFn, message: Any) -> Any:
    message.seconds = draw(st.integers(-315576000000 - 2, 315576000000 + 2))
    message.nanos = draw(st.sampled_from([0, 5, -5, 1000, 3_000_000, 999_999_999]))
    return message


@st.composite
def _mask(draw: st.DrawFn, message: Any) -> Any:
    message.paths.extend(draw(st.lists(st.from_regex(r"[a-z][a-z_.]{0,6}", fullmatch=True),
                                       max_size=3)))  # fmt: skip
    return message


@st.composite
def _struct_like(draw: st.DrawFn, message: Any) -> Any:
    document = draw(json_values)
    name = message.DESCRIPTOR.name
    try:
        if name == "Struct" and isinstance(document, dict):
            message.update(document)
        elif name == "ListValue" and isinstance(document, list):
            message.extend(document)
        elif name == "Value":
            json_format.ParseDict(document, message)
    except Exception:  # an integer no double holds: leave it out
        message.Clear()
    if name == "Value" and draw(st.booleans()):
        message.number_value = draw(st.sampled_from([math.inf, math.nan, 1.5]))
    return message


@st.composite
def _any(draw: st.DrawFn, message: Any) -> Any:
    if draw(st.booleans()):
        message.Pack(draw(messages(SCHEMA.pool.FindMessageTypeByName("codec.v1.Nested"))))
    return message


@st.composite
def _wrapper(draw: st.DrawFn, message: Any) -> Any:
    if draw(st.booleans()):
        message.value = draw(_scalar(message.DESCRIPTOR.fields_by_name["value"]))
    return message


_SPECIAL: dict[str, Callable[[Any], st.SearchStrategy[Any]]] = {
    "google.protobuf.Timestamp": _timestamp,
    "google.protobuf.Duration": _duration,
    "google.protobuf.FieldMask": _mask,
    "google.protobuf.Struct": _struct_like,
    "google.protobuf.Value": _struct_like,
    "google.protobuf.ListValue": _struct_like,
    "google.protobuf.Any": _any,
    **{f"google.protobuf.{kind}Value": _wrapper for kind in _WRAPPED},
}


def outcome(work: Callable[[], Any]) -> tuple[Any, ...]:
    """What ``work`` gave, exactly: its value's repr (types and order included), or its
    exception's type and text."""
    try:
        return ("value", repr(work()))
    except Exception as exc:
        return ("raised", type(exc), str(exc))


def _reference_decode(message: Any) -> Any:
    return json_format.MessageToDict(message, descriptor_pool=SCHEMA.pool)


# --- decode ---


@SETTINGS
@given(st.sampled_from(METHODS).flatmap(lambda m: st.tuples(st.just(m), messages(m.output_type))))
def test_decode_is_message_to_dict(case: tuple[MethodSchema, Any]) -> None:
    method, message = case
    assert outcome(lambda: method.codec().decode(message)) == outcome(
        lambda: _reference_decode(message)
    )


@SETTINGS
@given(messages(RICH.output_type))
def test_decode_of_bytes_is_the_json_format_path(message: Any) -> None:
    body = message.SerializeToString()
    expected = outcome(lambda: _reference_decode(RICH.output_class().FromString(body)))
    got = outcome(lambda: RICH.decode(body))
    if expected[0] == "raised":  # schema.decode says which exception, never a value
        assert got[:2] == ("raised", ValueError)
        assert got[2] == f"not a codec.v1.Rich: {expected[1].__name__}"
    else:
        assert got == expected


def test_decode_of_every_kind_is_compiled_not_a_fallback() -> None:
    """The common shapes go through the compiled table (not json_format behind it)."""
    message = _every_kind()
    compiled = Codec(SCHEMA.pool).decoder(message.DESCRIPTOR)(message)
    assert repr(compiled) == repr(_reference_decode(message))


def _every_kind() -> Any:
    message = RICH.output_class()(
        f_double=-0.5, f_float=0.1, f_int32=-3, f_int64=-(2**60), f_uint32=4, f_uint64=2**64 - 1,
        f_sint64=-5, f_fixed64=6, f_bool=True, f_string="é", f_bytes=b"\xff\x00", f_enum=2,
        r_int64=[1, -2], r_double=[math.inf, -math.inf, math.nan, 2.0], r_float=[0.3],
        r_enum=[1, 9], r_string=["a"], r_bytes=[b"ab?"], o_nested={"name": "n", "count": 2},
        opt_int32=0, m_str_int64={"a": 1}, m_int32_nested={-1: {"color": 1}},
        m_bool_str={True: "t", False: "f"}, m_uint64_enum={2**63: 5}, r_nested=[{}],
        legacy={"level": 7}, child={"child": {"f_string": "deep"}}, empty={},
        w_int64={"value": 0}, w_bytes={"value": b"x"}, w_float={"value": 1.1},
    )  # fmt: skip
    message.ts.FromJsonString("1972-01-01T10:00:20.021Z")
    message.dur.FromJsonString("-3.100s")
    message.mask.paths.extend(["a.b_c", "d"])
    message.st.update({"k": [1, "x", None, True, {"n": {}}]})
    message.val.list_value.extend([1.5, "s"])
    message.lv.extend([None])
    return message


# --- encode ---


def _as_carried(document: Any) -> Any:
    """``document`` as a caller's Value carries it: every number a float."""
    value = struct_pb2.Value()
    json_format.ParseDict(document, value)
    return json_format.MessageToDict(value)


@st.composite
def documents(draw: st.DrawFn, method: MethodSchema) -> Any:
    """A JSON request for ``method``: a message's JSON (as a Value carries it, or with exact
    integers), then maybe altered into what json_format may refuse or read differently."""
    message = draw(messages(method.input_type, sparse=True))  # sparse: a refusal is rarer
    try:
        document = json_format.MessageToDict(message, descriptor_pool=SCHEMA.pool)
    except Exception:  # no JSON form (a Timestamp out of range, ...)
        document = {}
    if draw(st.booleans()):
        with contextlib.suppress(Exception):  # NaN in a Value, an integer no double holds
            document = _as_carried(document)
    for _ in range(draw(st.integers(0, 2))):
        document = draw(_altered(document, method.input_type))
    return document


@st.composite
def _altered(draw: st.DrawFn, document: Any, descriptor: Any) -> Any:
    if not isinstance(document, dict):
        return draw(json_values) if draw(st.booleans()) else document
    document = dict(document)
    fields = list(descriptor.fields)
    field = draw(st.sampled_from(fields)) if fields else None
    choice = draw(st.integers(0, 5))
    if field is None or choice == 0:
        document[draw(st.text(max_size=5))] = draw(json_values)
    elif choice == 1:  # the field by its own name (and maybe by both)
        if field.json_name in document and draw(st.booleans()):
            document[field.name] = document.pop(field.json_name)
        else:
            document[field.name] = draw(_member(field))
    elif choice == 2 and isinstance(document.get(field.json_name), dict) and field.message_type:
        document[field.json_name] = draw(_altered(document[field.json_name], field.message_type))
    else:
        document[field.json_name] = draw(_member(field))
    return document


def _member(field: Any) -> st.SearchStrategy[Any]:
    """A value for ``field``'s JSON member: right or wrong, in the spellings that matter."""
    odd = st.sampled_from(
        ["1", " 1", "+1", "1e3", "1.0", "1_0", "-0", "0x1", "\u0661", "NaN", "Infinity",
         "-Infinity", "nan", "true", "false", "COLOR_RED", "SHADE_DARK", "TIER_X", "2", "7",
         "AAE=", "AA", "1972-01-01T10:00:20.021Z", "1.5s", "a.b", 1.5, 2.0, 2**63, -(2**63) - 1,
         2**64, 1e39, float("nan"), float("inf"), True, None, [], {}, [1, None], ["1", 2.0],
         {"a": 1}, {"1": {"name": "x"}, "01": {}}, {"true": "x"}]
    )  # fmt: skip
    confused = st.sampled_from([True, False, 0, -1, 2.0, 0.5, "", "x", "1", [], {}])
    near = _near_miss(field)
    return odd | confused | json_values | near | st.lists(near, max_size=2)


def _near_miss(field: Any) -> st.SearchStrategy[Any]:
    """Values at the edge of what ``field``'s kind takes."""
    if field.enum_type is not None:
        names = [value.name for value in field.enum_type.values]
        return st.sampled_from([*names, *(n.lower() for n in names), "COLOR_GREEN", 1.0, 9])
    if field.type in _INT_RANGES or field.type in _UINT_RANGES:
        edges = [-(2**31) - 1, -(2**31), 2**31 - 1, 2**31, 2**32, -(2**63) - 1, 2**63 - 1, 2**64]
        return st.sampled_from(edges).flatmap(lambda n: st.sampled_from([n, str(n), float(n)]))
    return st.sampled_from([True, 1.5, "1", "x"])


@SETTINGS
@given(st.sampled_from(METHODS).flatmap(lambda m: st.tuples(st.just(m), documents(m))))
def test_encode_is_parse_dict(case: tuple[MethodSchema, Any]) -> None:
    method, document = case
    expected = outcome(lambda: method.encode_by_json_format(document))
    assert outcome(lambda: method.encode(document)) == expected
    compiled = method.codec().encode(method.input_class()(), document, 64)
    if compiled is not None:  # only ever what json_format gives
        assert ("value", repr(compiled)) == expected


@pytest.mark.parametrize(
    ("method", "document"),
    [
        (RICH, {"fInt64": "-12", "fInt32": 3.0, "fEnum": "COLOR_BLUE", "fString": "ü",
                "nested": {"name": "n", "count": 4.0, "color": 1.0}, "rString": ["a", "b"],
                "rNested": [{"ratio": 0.5}], "mStrInt64": {"a": "1", "b": 2.0},
                "mInt32Nested": {"-4": {"name": "x"}}, "mBoolStr": {"true": "y"},
                "ts": "1972-01-01T10:00:20.021Z", "dur": "1.5s", "mask": "a.b,cD",
                "wInt64": "5", "wString": "s", "oNested": {}, "optInt32": 0, "fBytes": "AAE=",
                "f_double": 2, "empty": {}, "legacy": {"level": 7.0, "shade": "SHADE_DARK"}}),
        (STAMP, "2024-05-01T12:00:00Z"),
        (WRAPPED, "9007199254740993"),
    ],
)  # fmt: skip
def test_encode_of_plain_shapes_is_compiled_not_a_fallback(method: MethodSchema, document: Any):
    compiled = Codec(SCHEMA.pool).encode(method.input_class()(), document, 64)
    assert compiled is not None
    assert compiled == method.encode_by_json_format(document)


@pytest.mark.parametrize(
    "document",
    [
        {"fInt64": " 1"}, {"fInt64": "1e3"}, {"fInt32": 2**31}, {"fInt32": 1.5},
        {"fBool": "true"}, {"fString": 1}, {"fEnum": "COLOR_GREEN"}, {"fFloat": 1e39},
        {"fDouble": "NaN"}, {"oString": "a", "oInt64": "1"}, {"f_int32": 1, "fInt32": 2},
        {"nope": 1}, {"fInt32": None}, {"rString": "a"}, {"rString": [None]},
        {"mInt32Nested": {"1": {}, "01": {}}}, {"ts": "yesterday"}, {"st": {"a": 1}},
        {"any": {}}, {"fString": "\ud800"}, [], "x",
    ],
)  # fmt: skip
def test_encode_falls_back_when_in_doubt(document: Any) -> None:
    """Whatever the codec cannot prove goes to json_format, which accepts or refuses it."""
    assert Codec(SCHEMA.pool).encode(RICH.input_class()(), document, 64) is None
    assert outcome(lambda: RICH.encode(document)) == outcome(
        lambda: RICH.encode_by_json_format(document)
    )


def test_encode_refusals_keep_json_format_sentences() -> None:
    with pytest.raises(JsonMismatch) as refused:
        RICH.encode({"nested": {"count": "twelve"}})
    assert str(refused.value) == "at nested.count: expected an integer, or one as a string (int64)"


def test_encode_depth_limit_is_json_format_s() -> None:
    document: dict[str, Any] = {}
    for _ in range(70):
        document = {"child": document}
    assert Codec(SCHEMA.pool).encode(RICH.input_class()(), document, 64) is None
    with pytest.raises(JsonMismatch):
        RICH.encode(document)
    shallow: dict[str, Any] = {}
    for _ in range(60):
        shallow = {"child": shallow}
    assert RICH.encode(shallow) == RICH.encode_by_json_format(shallow)
