"""Per-method proto3 JSON codecs, compiled once from the descriptors: json_format's output, faster.

``json_format`` walks every message in pure Python and looks each field's rules up again on
every call (``ParseDict`` rebuilds a json_name table per message). A ``Codec`` does that work
once per message type: a table from each field to its JSON name and converter. Decoding reads
the fields protobuf's C runtime (upb) lists (``ListFields``); encoding sets them and lets upb
serialize. Measured on the bench's Quote (``python -m bench.codecs``): see docs/performance.md.

Exactly json_format's result or nothing: whatever a codec does not handle (an extension, Any,
a custom enum JSON name, a request value of a type it cannot prove json_format reads the same
way, null, a field given twice under its two names, ...) raises ``Unsupported`` inside, and the
caller falls back to json_format for the whole document, which keeps its exact results and
errors. The equivalence is tested in tests/unit/test_codecs.py.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor_pool, json_format, message
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.internal import type_checkers

Convert = Callable[[Any], Any]
_F = FieldDescriptor
_INT64 = frozenset((_F.CPPTYPE_INT64, _F.CPPTYPE_UINT64))
_INTEGER = frozenset((*_INT64, _F.CPPTYPE_INT32, _F.CPPTYPE_UINT32))
_GENERIC = frozenset(f"google.protobuf.{name}" for name in ("Timestamp", "Duration", "FieldMask"))
_VALUE, _STRUCT, _LIST = (f"google.protobuf.{n}" for n in ("Value", "Struct", "ListValue"))
# What json_format reads as an integer with int() and nothing else: a plain ASCII decimal
# (it also takes " 1"-less oddities such as "1_0", "+1" or "1e3": those go to json_format).
_DIGITS = re.compile(r"-?[0-9]+")
_SURROGATE = re.compile("[\ud800-\udfff]")
_FLOAT_MAX = float.fromhex("0x1.fffffep+127")  # json_format's bounds of a float (32-bit)


class Unsupported(Exception):
    """What a compiled codec does not handle: json_format does that document."""


class Codec:
    """One descriptor pool's compiled message codecs (a MethodSchema keeps one, made on first
    use); each message type's table is built on its first use, so a recursive type is fine."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self.pool = pool
        self._decoders: dict[str, Convert] = {}
        self._encoders: dict[str, _Encoder] = {}
        # json_format prints an enum value's custom JSON name when the default pool defines
        # pb.enumvalue.json: then every enum goes to json_format.
        self.plain_enums = not _has_custom_enum_names()

    def __repr__(self) -> str:
        return f"<Codec [{len(self._decoders)} decoders, {len(self._encoders)} encoders]>"

    def decode(self, answer: message.Message) -> Any:
        """``answer`` as json_format.MessageToDict gives it (json_format's own exceptions
        when it cannot)."""
        try:
            return self.decoder(answer.DESCRIPTOR)(answer)
        except Exception:  # Unsupported, or a value json_format refuses: it says how
            return json_format.MessageToDict(answer, descriptor_pool=self.pool)

    def encode(self, request: message.Message, value: Any, max_depth: int) -> bytes | None:
        """The bytes ParseDict of ``value`` into the empty ``request`` then SerializeToString
        give, or None when this codec cannot prove it: json_format must do it (and say why
        it does not fit, if it does not)."""
        try:
            self.encoder(request.DESCRIPTOR).fill(request, value, 1, max_depth)
            return request.SerializeToString()
        except Exception:  # Unsupported, out of range, a required field missing, ...
            return None

    def decoder(self, descriptor: Any) -> Convert:
        found = self._decoders.get(descriptor.full_name)
        if found is None:
            found = self._decoders[descriptor.full_name] = self._new_decoder(descriptor)
        return found

    def encoder(self, descriptor: Any) -> _Encoder:
        found = self._encoders.get(descriptor.full_name)
        if found is None:
            found = self._encoders[descriptor.full_name] = _Encoder(self, descriptor)
        return found

    def _new_decoder(self, descriptor: Any) -> Convert:
        name = descriptor.full_name
        if _is_wrapper(descriptor):
            convert = self.field_decoder(descriptor.fields_by_name["value"])
            return lambda wrapper: convert(wrapper.value)
        if name in _GENERIC:
            return _generic_to_json
        if name in (_VALUE, _STRUCT, _LIST):
            return {_VALUE: _value_to_json, _STRUCT: _struct_to_json, _LIST: _list_to_json}[name]
        if name == "google.protobuf.Any":
            return _unsupported
        return _Decoder(self, descriptor)

    def field_decoder(self, field: Any) -> Convert:
        """One value of ``field`` (an element, for a repeated one) as json_format prints it."""
        kind = field.cpp_type
        if kind == _F.CPPTYPE_MESSAGE:
            return self.decoder(field.message_type)
        if kind == _F.CPPTYPE_ENUM:
            return self._enum_decoder(field.enum_type)
        if kind == _F.CPPTYPE_STRING:
            return _base64 if field.type == _F.TYPE_BYTES else _same
        if kind in _INT64:
            return str
        if kind == _F.CPPTYPE_FLOAT:
            return _float_to_json
        if kind == _F.CPPTYPE_DOUBLE:
            return _double_to_json
        return _same  # bool, int32, uint32: Python values already

    def _enum_decoder(self, enum: Any) -> Convert:
        if enum.full_name == "google.protobuf.NullValue":
            return _null
        if not self.plain_enums:
            return _unsupported
        names = {number: value.name for number, value in enum.values_by_number.items()}
        closed = enum.is_closed

        def enum_to_json(number: int) -> Any:
            name = names.get(number)
            if name is None and closed:  # json_format refuses it: let it say so
                raise Unsupported
            return number if name is None else name

        return enum_to_json


class _Decoder:
    """A regular message's fields as json_format's _RegularMessageToJsonObject prints them."""

    __slots__ = ("_codec", "_descriptor", "_table")

    def __init__(self, codec: Codec, descriptor: Any) -> None:
        self._codec = codec
        self._descriptor = descriptor
        self._table: dict[Any, tuple[str, Convert]] | None = None

    def __call__(self, answer: message.Message) -> dict[str, Any]:
        table = self._table
        if table is None:
            table = self._table = self._compiled()
        document = {}
        for field, value in answer.ListFields():
            name, convert = table[field]  # KeyError for an extension: json_format prints it
            document[name] = convert(value)
        return document

    def _compiled(self) -> dict[Any, tuple[str, Convert]]:
        return {field: (field.json_name, self._field(field)) for field in self._descriptor.fields}

    def _field(self, field: Any) -> Convert:
        if _is_map(field):
            return _map_decoder(
                self._codec.field_decoder(field.message_type.fields_by_name["value"])
            )
        convert = self._codec.field_decoder(field)
        if not field.is_repeated:
            return convert
        if convert is _same:
            return list
        return lambda values: [convert(value) for value in values]


def _map_decoder(convert: Convert) -> Convert:
    def map_to_json(entries: Any) -> dict[str, Any]:
        return {_map_key(key): convert(entries[key]) for key in entries}

    return map_to_json


def _map_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _same(value: Any) -> Any:
    return value


def _null(value: Any) -> None:
    return None


def _unsupported(value: Any) -> Any:
    raise Unsupported


def _base64(value: bytes) -> str:
    return base64.b64encode(value).decode("utf-8")


def _special(value: float) -> str | None:
    if math.isinf(value):
        return "-Infinity" if value < 0.0 else "Infinity"
    if math.isnan(value):
        return "NaN"
    return None


def _float_to_json(value: float) -> Any:
    special = _special(value)
    return type_checkers.ToShortestFloat(value) if special is None else special


def _double_to_json(value: float) -> Any:
    special = _special(value)
    return value if special is None else special


def _generic_to_json(value: Any) -> Any:
    return value.ToJsonString()


def _value_to_json(value: Any) -> Any:
    which = value.WhichOneof("kind")
    if which is None or which == "null_value":
        return None
    if which == "number_value":
        number = value.number_value
        if not math.isfinite(number):  # json_format refuses it: let it say so
            raise Unsupported
        return number
    if which == "list_value":
        return _list_to_json(value.list_value)
    if which == "struct_value":
        return _struct_to_json(value.struct_value)
    return getattr(value, which)  # string_value, bool_value


def _struct_to_json(struct: Any) -> dict[str, Any]:
    fields = struct.fields
    return {key: _value_to_json(fields[key]) for key in fields}


def _list_to_json(values: Any) -> list[Any]:
    return [_value_to_json(value) for value in values.values]


class _Encoder:
    """Sets a message's fields from a JSON object as json_format's ParseDict would, for the
    shapes it can prove that for; raises Unsupported for any other."""

    __slots__ = ("_codec", "_descriptor", "_fields", "_fill")

    def __init__(self, codec: Codec, descriptor: Any) -> None:
        self._codec = codec
        self._descriptor = descriptor
        self._fields: dict[str, _Setter] | None = None
        self._fill = self._special(descriptor)

    def fill(self, target: Any, value: Any, depth: int, max_depth: int) -> None:
        if depth > max_depth:
            raise Unsupported
        if self._fill is not None:
            self._fill(target, value)
            return
        if type(value) is not dict:
            raise Unsupported
        fields = self._fields
        if fields is None:
            fields = self._fields = self._compiled()
        seen: set[Any] = set()
        for key, member in value.items():
            setter = fields.get(key) if type(key) is str else None
            if setter is None or member is None:  # unknown, an extension, or null
                raise Unsupported
            setter.claim(seen)
            setter.set(target, member, depth, max_depth)

    def _compiled(self) -> dict[str, _Setter]:
        # json_format looks a key up by json_name first, then by the field's own name.
        fields = self._descriptor.fields
        by_name = {field.name: _Setter(self._codec, field) for field in fields}
        return by_name | {field.json_name: by_name[field.name] for field in fields}

    def _special(self, descriptor: Any) -> Callable[[Any, Any], None] | None:
        """The setter of a well-known type whose JSON form is not an object of its fields."""
        if _is_wrapper(descriptor):
            convert = _field_encoder(descriptor.fields_by_name["value"], require_str=False)
            return lambda wrapper, value: setattr(wrapper, "value", convert(value))
        if descriptor.full_name in _GENERIC:
            return _generic_from_json
        if descriptor.full_name in (_VALUE, _STRUCT, _LIST, "google.protobuf.Any"):
            return _refuse
        return None


class _Setter:
    """One field of a message being encoded."""

    __slots__ = ("_kind", "_name", "_number", "_oneof", "codec", "convert", "field", "key")

    def __init__(self, codec: Codec, field: Any) -> None:
        self.codec = codec
        self.field = field
        self._name = field.name
        self._number = field.number
        oneof = field.containing_oneof
        self._oneof = None if oneof is None else f"oneof {oneof.name}"
        self.key: Convert | None = None
        self.convert: Convert | None = None
        if _is_map(field):
            entry = field.message_type
            self.key = _field_encoder(entry.fields_by_name["key"], require_str=True)
            self._kind, self.field = "map", entry.fields_by_name["value"]
        else:
            self._kind = "repeated" if field.is_repeated else "single"
        if self.field.cpp_type != _F.CPPTYPE_MESSAGE:
            if self.field.cpp_type == _F.CPPTYPE_ENUM and not codec.plain_enums:
                self.convert = _unsupported
            else:
                self.convert = _field_encoder(self.field, require_str=False)

    def claim(self, seen: set[Any]) -> None:
        """The field given twice (its two names) or a second member of its oneof: json_format
        merges the one or refuses the other; either way it is json_format's to do."""
        if self._number in seen or self._oneof in seen:
            raise Unsupported
        seen.add(self._number)
        if self._oneof is not None:
            seen.add(self._oneof)

    def set(self, target: Any, member: Any, depth: int, max_depth: int) -> None:
        if self._kind == "single":
            self._single(target, member, depth, max_depth)
        elif self._kind == "repeated":
            self._repeated(target, member, depth, max_depth)
        else:
            self._map(target, member, depth, max_depth)

    def _single(self, target: Any, member: Any, depth: int, max_depth: int) -> None:
        if self.convert is not None:
            setattr(target, self._name, self.convert(member))
            return
        inner = getattr(target, self._name)
        inner.SetInParent()
        self._message(inner, member, depth, max_depth)

    def _repeated(self, target: Any, members: Any, depth: int, max_depth: int) -> None:
        if not isinstance(members, (list, tuple)):
            raise Unsupported
        values = getattr(target, self._name)
        convert = self.convert
        if convert is not None:
            values.extend([convert(member) for member in members])
            return
        for member in members:
            if member is None:
                raise Unsupported
            self._message(values.add(), member, depth, max_depth)

    def _map(self, target: Any, members: Any, depth: int, max_depth: int) -> None:
        if type(members) is not dict:
            raise Unsupported
        assert self.key is not None
        entries = getattr(target, self._name)
        convert = self.convert
        for key, member in members.items():
            converted = self.key(key)
            if converted in entries or member is None:  # two keys for one entry ("1", "01")
                raise Unsupported
            if convert is not None:
                entries[converted] = convert(member)
            else:
                self._message(entries[converted], member, depth, max_depth)

    def _message(self, inner: Any, member: Any, depth: int, max_depth: int) -> None:
        self.codec.encoder(self.field.message_type).fill(inner, member, depth + 1, max_depth)


def _field_encoder(field: Any, require_str: bool) -> Convert:
    """A JSON value as json_format converts it for a scalar ``field`` (Unsupported when in
    doubt); ``require_str``: a map key, always a string in JSON."""
    kind = field.cpp_type
    if kind in _INTEGER:
        return _integer
    if kind == _F.CPPTYPE_BOOL:
        return _bool_key if require_str else _bool
    if kind == _F.CPPTYPE_STRING:
        return _bytes if field.type == _F.TYPE_BYTES else _string
    if kind == _F.CPPTYPE_DOUBLE:
        return _double
    if kind == _F.CPPTYPE_FLOAT:
        return _float
    if kind == _F.CPPTYPE_ENUM:
        return _enum_encoder(field.enum_type)
    raise Unsupported


def _integer(value: Any) -> int:
    kind = type(value)
    if kind is int:
        return value  # type: ignore[no-any-return]
    if kind is float and value.is_integer():
        return int(value)
    if kind is str and _DIGITS.fullmatch(value):
        return int(value)
    raise Unsupported


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise Unsupported
    return value


def _bool_key(value: Any) -> bool:
    if value == "true" and type(value) is str:
        return True
    if value == "false" and type(value) is str:
        return False
    raise Unsupported


def _string(value: Any) -> str:
    if type(value) is not str or (not value.isascii() and _SURROGATE.search(value)):
        raise Unsupported
    return value


def _bytes(value: Any) -> bytes:
    if type(value) is not str:
        raise Unsupported
    encoded = value.encode("utf-8")  # json_format's own steps, in its order
    return base64.urlsafe_b64decode(encoded + b"=" * (4 - len(encoded) % 4))


def _double(value: Any) -> float:
    kind = type(value)
    if kind is float and math.isfinite(value):
        return value  # type: ignore[no-any-return]
    if kind is int:
        return float(value)
    raise Unsupported  # NaN, Infinity, strings, bools: json_format's rules


def _float(value: Any) -> float:
    if type(value) is float and not (-_FLOAT_MAX <= value <= _FLOAT_MAX):
        raise Unsupported
    return _double(value)


def _enum_encoder(enum: Any) -> Convert:
    numbers: dict[str, int] = {name: value.number for name, value in enum.values_by_name.items()}
    known = frozenset(enum.values_by_number)

    def enum_from_json(value: Any) -> int:
        if type(value) is str:
            number = numbers.get(value)
        else:
            number = _integer(value) if type(value) in (int, float) else None
        if number is None or number not in known:
            raise Unsupported
        return number

    return enum_from_json


def _generic_from_json(target: Any, value: Any) -> None:
    if type(value) is not str:
        raise Unsupported
    target.FromJsonString(value)


def _refuse(target: Any, value: Any) -> None:
    raise Unsupported


def _has_custom_enum_names() -> bool:
    try:  # where json_format looks for it: only in the default pool
        descriptor_pool.Default().FindExtensionByName("pb.enumvalue.json")
    except KeyError:
        return False
    return True


def _is_wrapper(descriptor: Any) -> bool:
    return bool(descriptor.file.name == "google/protobuf/wrappers.proto")  # json_format's test


def _is_map(field: Any) -> bool:
    entry = field.message_type
    return (
        field.type == _F.TYPE_MESSAGE and entry.has_options and bool(entry.GetOptions().map_entry)
    )
