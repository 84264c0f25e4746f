"""What a gRPC upstream's messages look like, and their proto3 JSON mapping.

A ``Schema`` is one upstream's descriptors at one moment (from its server reflection or from a
``FileDescriptorSet`` file): its methods, each with its input and output message. A
``MethodSchema`` turns a JSON request into the input message's bytes and an answer's bytes into
JSON, as the proto3 JSON mapping says (``json_name`` field names, enum names, 64-bit integers
as strings, well-known types in their JSON forms)::

    schema = load_descriptor_set("shop.pb")
    method = schema.find("/shop.v1.Catalog/Get")
    method.encode({"sku": "A-1"})  # -> b"\\n\\x03A-1"

Pure protobuf, no I/O: the fetching lives in aggregator/upstreams/descriptors.py.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import (
    any_pb2,
    api_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    json_format,
    message,
    message_factory,
    source_context_pb2,
    struct_pb2,
    timestamp_pb2,
    type_pb2,
    wrappers_pb2,
)
from google.protobuf.descriptor import FieldDescriptor

from aggregator.codecs import Codec

# Nesting allowed in a JSON request or answer (json_format's own default is 100).
MAX_DEPTH = 64
# How much of a library's error text a sentence quotes.
_QUOTED = 300
# The proto3 JSON mapping costs about 16 times what json.loads does per byte, both ways
# (measured: 35 ms for a 30 KB message of packed ints): the weight for the off-loop threshold.
MAPPING_COST = 16
# The protobuf runtime's own files: an upstream's copy of one is replaced by it, and no other
# file may define a google.protobuf package (a redefined Duration broke every JSON mapping).
_RUNTIME_MODULES = (
    *(any_pb2, api_pb2, descriptor_pb2, duration_pb2, empty_pb2, field_mask_pb2),
    *(source_context_pb2, struct_pb2, timestamp_pb2, type_pb2, wrappers_pb2),
)
_RUNTIME_PACKAGE = "google.protobuf"
# Messages whose JSON form is not an object of their fields.
_WELL_KNOWN = frozenset(
    f"{_RUNTIME_PACKAGE}.{name}"
    for name in (
        *("Any", "Duration", "Timestamp", "FieldMask", "Struct", "Value", "ListValue"),
        *("DoubleValue", "FloatValue", "Int64Value", "UInt64Value", "Int32Value"),
        *("UInt32Value", "BoolValue", "StringValue", "BytesValue"),
    )
)


class JsonMismatch(ValueError):
    """A JSON request does not fit the method's input message; the text says where."""


@dataclass(slots=True)
class MethodSchema:
    """One method's input and output messages (classes made on first use)."""

    name: str  # /package.Service/Method
    input_type: Any  # descriptor.Descriptor
    output_type: Any
    pool: descriptor_pool.DescriptorPool
    _input: type[message.Message] | None = None
    _output: type[message.Message] | None = None
    _codec: Codec | None = None

    def __repr__(self) -> str:
        types = f"{self.input_type.full_name} -> {self.output_type.full_name}"
        return f"<MethodSchema {self.name} {types}>"

    def input_class(self) -> type[message.Message]:
        if self._input is None:
            self._input = message_factory.GetMessageClass(self.input_type)
        return self._input

    def output_class(self) -> type[message.Message]:
        if self._output is None:
            self._output = message_factory.GetMessageClass(self.output_type)
        return self._output

    def codec(self) -> Codec:
        """The compiled codec of this method's messages (aggregator/codecs.py), made once."""
        if self._codec is None:
            self._codec = Codec(self.pool)
        return self._codec

    def encode(self, value: Any) -> bytes:
        """The input message's bytes for the JSON ``value``; JsonMismatch when it does not fit,
        saying where and what was expected there, never quoting a value (a substituted one
        may be a secret: docs/security.md). The compiled codec's bytes when it can prove them
        json_format's; else json_format, whose failures are the ones said."""
        compiled = self.codec().encode(self.input_class()(), value, MAX_DEPTH)
        return self.encode_by_json_format(value) if compiled is None else compiled

    def encode_by_json_format(self, value: Any) -> bytes:
        """encode by json_format alone: what the compiled codec must equal, and its fallback."""
        request = self.input_class()()
        try:
            json_format.ParseDict(
                value, request, descriptor_pool=self.pool, max_recursion_depth=MAX_DEPTH
            )
        except Exception:  # ParseError, and what ParseDict lets through (TypeError, ...)
            raise JsonMismatch(
                _Misfit(self.pool).of(self.input_type, value, "", MAX_DEPTH)
            ) from None
        try:
            return request.SerializeToString()
        except message.EncodeError:  # a proto2 required field left out: its path is no value
            missing = ", ".join(request.FindInitializationErrors()[:8])  # type: ignore[attr-defined]
            raise JsonMismatch(f"required fields missing: {missing}") from None

    def decode(self, body: bytes) -> Any:
        """The answer ``body`` in the proto3 JSON mapping; ValueError when it does not parse or
        has no JSON form (a Timestamp out of range, ...). Only protobuf runs here, on bytes and
        descriptors an upstream chose: whatever it raises is that upstream's answer failing."""
        answer = self.output_class()()
        try:
            answer.ParseFromString(body)
            # Python values; a top-level well-known type may give a non-dict. The compiled
            # codec, which falls back to json_format for what it does not handle.
            return self.codec().decode(answer)
        except Exception as exc:
            raise ValueError(f"not a {self.output_type.full_name}: {type(exc).__name__}") from None


@dataclass(frozen=True, slots=True)
class _Misfit:
    """Where a JSON value does not fit a message and what was expected there: a field path
    (json names, array indexes) and a type, never a value, nor a key that may be one. Only on
    the error path: one ParseDict per member at each level walked."""

    pool: descriptor_pool.DescriptorPool

    def of(self, descriptor: Any, value: Any, path: str, depth: int) -> str:
        at = f"at {path}: " if path else ""
        if descriptor.full_name in _WELL_KNOWN or depth <= 0 or not isinstance(value, dict):
            return f"{at}expected {_message_kind(descriptor)}"
        fields = {f.json_name: f for f in descriptor.fields} | {
            f.name: f for f in descriptor.fields
        }
        for key, member in value.items():
            field = fields.get(key) if isinstance(key, str) else None
            if field is None:
                known = ", ".join(f.json_name for f in descriptor.fields[:16])
                return f"{at}a field {descriptor.full_name} does not have (it has: {known})"
            if not self._fits(descriptor, {key: member}):
                return self._field(field, member, f"{path}.{field.json_name}".lstrip("."), depth)
        return f"{at}does not fit {descriptor.full_name}"

    def _field(self, field: Any, member: Any, path: str, depth: int) -> str:
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            entry_type = value_field.message_type
            if isinstance(member, dict) and entry_type is not None:
                for entry in member.values():  # keys are data: the path does not name them
                    if not self._fits(entry_type, entry):
                        return self._one(value_field, entry, f"{path}{{}}", depth)
            return f"at {path}: expected an object of {_field_kind(value_field)}"
        if field.is_repeated:
            if isinstance(member, list):
                for index, element in enumerate(member):
                    if not self._fits(field.containing_type, {field.json_name: [element]}):
                        return self._one(field, element, f"{path}[{index}]", depth)
            return f"at {path}: expected an array of {_field_kind(field)}"
        return self._one(field, member, path, depth)

    def _one(self, field: Any, member: Any, path: str, depth: int) -> str:
        if field.message_type is not None and field.message_type.full_name not in _WELL_KNOWN:
            return self.of(field.message_type, member, path, depth - 1)
        return f"at {path}: expected {_field_kind(field)}"

    def _fits(self, descriptor: Any, value: Any) -> bool:
        """Whether ``value`` parses as message ``descriptor``."""
        try:
            json_format.ParseDict(
                value,
                message_factory.GetMessageClass(descriptor)(),
                descriptor_pool=self.pool,
                max_recursion_depth=MAX_DEPTH,
            )
        except Exception:
            return False
        return True


def _is_map(field: Any) -> bool:
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry


def _field_kind(field: Any) -> str:
    if field.enum_type is not None:
        return f"a name or number of {field.enum_type.full_name}"
    if field.message_type is not None:
        return _message_kind(field.message_type)
    return _SCALAR_KINDS.get(field.type, "a value")


def _message_kind(descriptor: Any) -> str:
    if descriptor.full_name in _WELL_KNOWN:
        return f"the JSON form of {descriptor.full_name}"
    return f"an object ({descriptor.full_name})"


_INTEGER = "an integer, or one as a string"
_SCALAR_KINDS = {
    FieldDescriptor.TYPE_STRING: "a string",
    FieldDescriptor.TYPE_BYTES: "base64 text",
    FieldDescriptor.TYPE_BOOL: "true or false",
    FieldDescriptor.TYPE_FLOAT: "a number",
    FieldDescriptor.TYPE_DOUBLE: "a number",
    **{
        kind: f"{_INTEGER} ({name})"
        for name, kind in (
            ("int32", FieldDescriptor.TYPE_INT32),
            ("int64", FieldDescriptor.TYPE_INT64),
            ("uint32", FieldDescriptor.TYPE_UINT32),
            ("uint64", FieldDescriptor.TYPE_UINT64),
            ("sint32", FieldDescriptor.TYPE_SINT32),
            ("sint64", FieldDescriptor.TYPE_SINT64),
            ("fixed32", FieldDescriptor.TYPE_FIXED32),
            ("fixed64", FieldDescriptor.TYPE_FIXED64),
            ("sfixed32", FieldDescriptor.TYPE_SFIXED32),
            ("sfixed64", FieldDescriptor.TYPE_SFIXED64),
        )
    },
}


class Schema:
    """One upstream's descriptors: the methods of every service it offered that loaded.

    A service whose file did not load (an import nobody served, a broken descriptor) is kept
    in ``broken`` with the sentence saying why, so a call to it is told that, not "no method".
    """

    def __init__(
        self,
        files: Iterable[descriptor_pb2.FileDescriptorProto],
        services: Iterable[str] | None = None,
        origin: str = "",
        digest: str = "",
    ) -> None:
        self.origin = origin  # "its reflection", "descriptors file x.pb"
        self.digest = digest  # of the files as fetched (upstreams/descriptors.py), if fetched
        self.pool = descriptor_pool.DescriptorPool()
        failures: dict[str, str] = {}
        by_name = _with_runtime_files(files, failures)
        _add_files(self.pool, by_name, origin, failures)
        if services is None:  # a file: every service it defines
            services = [
                f"{file.package}.{service.name}" if file.package else service.name
                for file in by_name.values()
                for service in file.service
            ]
        self.services: dict[str, Any] = {}
        self.broken: dict[str, str] = {}
        for name in services:
            try:
                self.services[name] = self.pool.FindServiceByName(name)
            except KeyError:
                self.broken[name] = _why_missing(name, by_name, failures, origin)
        self._methods: dict[str, MethodSchema] = {}

    def __repr__(self) -> str:
        methods = sum(len(service.methods) for service in self.services.values())
        broken = f", {len(self.broken)} broken" if self.broken else ""
        return f"<Schema {self.origin} [{len(self.services)} services, {methods} methods{broken}]>"

    def find(self, method: str) -> MethodSchema | None:
        """The schema of ``/package.Service/Method``, or None when the upstream has none."""
        found = self._methods.get(method)
        if found is not None:
            return found
        service_name, _, method_name = method[1:].partition("/")
        service = self.services.get(service_name)
        if service is None:
            return None
        descriptor = service.methods_by_name.get(method_name)
        if descriptor is None:
            return None
        # Only methods the upstream has are kept: bounded by its descriptors, not by callers.
        found = MethodSchema(method, descriptor.input_type, descriptor.output_type, self.pool)
        self._methods[method] = found
        return found

    def broken_reason(self, method: str) -> str | None:
        """Why ``method``'s service cannot be used, if it was offered but did not load."""
        return self.broken.get(method[1:].partition("/")[0])


def _with_runtime_files(
    files: Iterable[descriptor_pb2.FileDescriptorProto], failures: dict[str, str]
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """``files`` by name, each well-known file replaced by the protobuf runtime's copy; a file
    that otherwise defines a google.protobuf package is refused (in ``failures``), so whatever
    imports it does not load either."""
    runtime = _runtime_files()
    by_name = {}
    for file in files:
        package = file.package
        if file.name in runtime:
            by_name[file.name] = runtime[file.name]
            continue
        if package == _RUNTIME_PACKAGE or package.startswith(f"{_RUNTIME_PACKAGE}."):
            failures[file.name] = (
                f"{_quoted(file.name)} defines package {_quoted(package)}, which is the protobuf "
                "runtime's own"
            )
        by_name[file.name] = file
    return by_name


@functools.cache
def _runtime_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    files = {}
    for module in _RUNTIME_MODULES:
        file = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file)
        files[file.name] = file
    return files


def _add_files(
    pool: descriptor_pool.DescriptorPool,
    files: Mapping[str, descriptor_pb2.FileDescriptorProto],
    origin: str,
    failures: dict[str, str],
) -> None:
    """Adds every file after its imports (iteratively: a long import chain must not exhaust
    the stack); ``failures`` gains the files that could not be added, with the reason."""
    added: set[str] = set()
    for root in files:
        stack = [root]
        while stack:
            name = stack[-1]
            if name in added or name in failures:
                stack.pop()
                continue
            file = files[name]
            pending = [dep for dep in file.dependency if dep not in added and dep not in failures]
            missing = [dep for dep in pending if dep not in files]
            if missing:
                failures[name] = f"{name} imports {missing[0]}, which {origin} does not have"
            elif pending:
                if any(dep in stack for dep in pending):
                    failures[name] = f"{name} is part of an import cycle"
                else:
                    stack.extend(pending)
                    continue
            elif any(dep in failures for dep in file.dependency):
                bad = next(dep for dep in file.dependency if dep in failures)
                failures[name] = failures[bad]
            else:
                try:
                    pool.AddSerializedFile(file.SerializeToString())
                    added.add(name)
                except Exception as exc:  # upb raises TypeError, python ValueError/KeyError...
                    failures[name] = _quoted(f"{name} does not load: {exc}")
            stack.pop()


def _why_missing(
    service: str,
    files: Mapping[str, descriptor_pb2.FileDescriptorProto],
    failures: Mapping[str, str],
    origin: str,
) -> str:
    for file in files.values():
        prefix = f"{file.package}." if file.package else ""
        if any(prefix + defined.name == service for defined in file.service):
            return failures.get(file.name, f"{file.name} did not load")
    return f"{origin} lists {service} but serves no file defining it"


def _quoted(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _QUOTED else line[: _QUOTED - 5] + " ..."


def read_descriptor_set(data: bytes, origin: str) -> Schema:
    """A Schema from a serialized ``FileDescriptorSet``; ValueError saying what is wrong."""
    files = descriptor_pb2.FileDescriptorSet()
    try:
        files.ParseFromString(data)
    except message.DecodeError:
        raise ValueError(f"{origin} is not a FileDescriptorSet") from None
    if not files.file:
        raise ValueError(f"{origin} holds no files (protoc --descriptor_set_out writes one)")
    schema = Schema(files.file, origin=origin)
    if schema.broken:
        raise ValueError(f"{next(iter(schema.broken.values()))} (make it with --include_imports)")
    return schema


def load_descriptor_set(path: str) -> Schema:
    """read_descriptor_set of the file at ``path``; ValueError naming it when unusable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{path!r}: cannot read: {exc.strerror}") from None
    return read_descriptor_set(data, f"descriptors file {path}")
