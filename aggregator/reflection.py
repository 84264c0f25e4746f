"""Server reflection under both of its names, for grpcurl and ``buf curl``.

grpcio-reflection serves ``grpc.reflection.v1alpha.ServerReflection`` only; grpcurl and
``buf curl`` ask for ``grpc.reflection.v1.ServerReflection`` first and fall back, a wasted round
trip on every call they make. The two protocols are the same messages in two packages, identical
on the wire, so v1 is served here by v1alpha's own servicer, on raw bytes.

Listing v1 is not enough: grpcurl ``describe`` and ``buf curl --list-methods`` resolve every
listed service's file, and grpcio-reflection ships no v1 descriptor. v1's file
(``grpc/reflection/v1/reflection.proto``) is therefore made from v1alpha's, renamed, and added to
the default descriptor pool the servicer reads, unless a newer grpcio already put it there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serves reflection (v1 and v1alpha) listing ``service_names`` and itself."""
    _register_v1_file(descriptor_pool.Default())
    names = (*service_names, V1_SERVICE, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((_v1_handler(servicer),))


def _v1_handler(servicer: Any) -> grpc.GenericRpcHandler[Any, Any]:
    async def info(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        parsed = (reflection_pb2.ServerReflectionRequest.FromString(raw) async for raw in requests)
        async for response in servicer.ServerReflectionInfo(parsed, context):
            yield response.SerializeToString()

    method = grpc.stream_stream_rpc_method_handler(info)
    return grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": method})


def _register_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds v1's reflection.proto to ``pool``: v1alpha's file under v1's name and package."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    pool.AddSerializedFile(v1_file().SerializeToString())


def v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's reflection.proto with every name moved to ``grpc.reflection.v1``."""
    alpha = reflection_pb2.DESCRIPTOR
    file = descriptor_pb2.FileDescriptorProto()
    alpha.CopyToProto(file)
    file.name = V1_FILE
    file.package = V1_PACKAGE
    file.ClearField("options")
    moved = _mover(f".{alpha.package}.", f".{V1_PACKAGE}.")
    _move_fields(file.message_type, moved)
    for service in file.service:
        for method in service.method:
            method.input_type = moved(method.input_type)
            method.output_type = moved(method.output_type)
    return file


def _mover(old: str, new: str) -> Callable[[str], str]:
    return lambda name: new + name[len(old) :] if name.startswith(old) else name


def _move_fields(
    messages: Iterable[descriptor_pb2.DescriptorProto], moved: Callable[[str], str]
) -> None:
    for message in messages:
        for field in message.field:
            if field.HasField("type_name"):  # assigning "" would mark a scalar as typed
                field.type_name = moved(field.type_name)
        _move_fields(message.nested_type, moved)
