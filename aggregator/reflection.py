"""Server reflection under both of its names, for grpcurl and ``buf curl``.

grpcio-reflection serves ``grpc.reflection.v1alpha.ServerReflection`` only; grpcurl and
``buf curl`` ask for ``grpc.reflection.v1.ServerReflection`` first and fall back, a wasted round
trip on every call they make. The two protocols are the same messages in two packages, identical
on the wire, so v1 is served here by v1alpha's own servicer, on raw bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1_SERVICE = "grpc.reflection.v1.ServerReflection"


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serves reflection (v1 and v1alpha) listing ``service_names`` and itself."""
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
