"""A typed gRPC upstream (``shop.v1.Catalog``, tests/protos/shop/v1/shop.proto) for the tests of
gRPC targets in JSON, with its reflection served well, not at all, or badly.

The proto is compiled at test time (grpc_tools.protoc ``--descriptor_set_out --include_imports``):
the upstream's message classes come from that descriptor set, in a pool of their own, and the
same file is what ``descriptors: PATH`` is tested with. Nothing generated is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import grpc
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    message_factory,
)
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_tools import protoc

from tests.upstreams import Recorder

PROTOS = Path(__file__).parent / "protos"
SERVICE = "shop.v1.Catalog"
Reflection = Literal["v1alpha", "none", "hang", "garbage", "no-imports", "endless"]


def compile_descriptor_set(out: Path) -> Path:
    """tests/protos/shop/v1/shop.proto as a FileDescriptorSet with its imports, at ``out``."""
    well_known = resources.files("grpc_tools") / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{PROTOS}",
            f"-I{well_known}",
            f"--descriptor_set_out={out}",
            "--include_imports",
            "shop/v1/shop.proto",
        ]
    )
    assert code == 0, "protoc failed on tests/protos/shop/v1/shop.proto"
    return out


def with_method(files: descriptor_pb2.FileDescriptorSet, name: str) -> None:
    """Adds method ``name`` (Product -> Product) to Catalog: the upstream, redeployed."""
    shop = next(file for file in files.file if file.name == "shop/v1/shop.proto")
    service = next(service for service in shop.service if service.name == "Catalog")
    service.method.add(name=name, input_type=".shop.v1.Product", output_type=".shop.v1.Product")


@dataclass
class Catalog:
    """The running upstream: where it listens, what it saw, its message classes."""

    port: int
    recorder: Recorder
    classes: dict[str, Any]
    pool: descriptor_pool.DescriptorPool

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def calls(self, method: str = "") -> int:
        """How many calls reached the Catalog service (of ``method``, if named)."""
        return sum(1 for seen in self.recorder.requests if method in ("", seen["method"]))


def _classes(files: descriptor_pb2.FileDescriptorSet) -> tuple[Any, dict[str, Any]]:
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.AddSerializedFile(file.SerializeToString())
    names = ("Product", "GetProductRequest", "ListProductsRequest", "ListProductsResponse",
             "RefuseRequest", "Money")  # fmt: skip
    classes = {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"shop.v1.{name}"))
        for name in names
    }
    return pool, classes


def _product(classes: dict[str, Any], sku: str) -> Any:
    product = classes["Product"](
        sku=sku,
        display_name=f"Product {sku}",
        color=2,  # COLOR_BLUE
        stock_count=9007199254740993,  # 2**53 + 1: exact only as a string in JSON
        tags=["fresh", "local"],
        warehouse_stock={"berlin": 3, "lyon": 0},
    )
    product.price.currency_code, product.price.units, product.price.nanos = "EUR", 12, 500000000
    product.updated_at.FromJsonString("2024-05-01T12:00:00Z")
    product.shelf_life.FromSeconds(3600)
    product.attributes.update({"organic": True, "grams": 250})
    product.history.add(currency_code="EUR", units=11)
    return product


def _refusal(classes: dict[str, Any], request: Any) -> status_pb2.Status:
    status = status_pb2.Status(code=request.code or 3, message="the catalog refuses")
    makers: dict[str, Callable[[], Any]] = {
        "error_info": lambda: error_details_pb2.ErrorInfo(
            reason="SKU_LOCKED", domain="shop.example.com", metadata={"sku": "A-1"}
        ),
        "bad_request": lambda: error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="sku", description="must be 8 digits"
                )
            ]
        ),
        "retry_info": lambda: error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(nanos=300_000_000)
        ),
        "resource_info": lambda: error_details_pb2.ResourceInfo(
            resource_type="sku", resource_name="A-1", owner="team-catalog", description="locked"
        ),
        "long": lambda: error_details_pb2.ErrorInfo(reason="R" * 5000, domain="d"),
    }
    for name in request.details:
        packed = any_pb2.Any()
        if name in makers:
            packed.Pack(makers[name]())
        else:
            packed.type_url, packed.value = f"type.googleapis.com/shop.v1.{name}", b"\x08\x01"
        status.details.append(packed)
    return status


def _catalog_handler(recorder: Recorder, classes: dict[str, Any], extra: tuple[str, ...]) -> Any:
    def seen(method: str, request: Any, context: Any) -> None:
        recorder.enter(
            {
                "method": method,
                "request": request,
                "metadata": dict(context.invocation_metadata() or ()),
            }
        )
        recorder.leave()

    async def get_product(request: Any, context: Any) -> Any:
        seen("GetProduct", request, context)
        if request.sku == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no product {request.sku}")
        return _product(classes, request.sku)

    async def list_products(request: Any, context: Any) -> Any:
        seen("ListProducts", request, context)
        skus = ["A-1", "B-2", "C-3"][: request.page_size or 3]
        return classes["ListProductsResponse"](
            products=[_product(classes, sku) for sku in skus], next_page_token="p2"
        )

    async def echo(request: Any, context: Any) -> Any:
        seen("Echo", request, context)
        return request

    async def refuse(request: Any, context: Any) -> Any:
        seen("Refuse", request, context)
        status = _refusal(classes, request)
        code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
        await context.abort(
            code, status.message, (("grpc-status-details-bin", status.SerializeToString()),)
        )

    def unary(fn: Any, request: str, response: str) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=classes[request].FromString,
            response_serializer=classes[response].SerializeToString,
        )

    methods = {
        "GetProduct": unary(get_product, "GetProductRequest", "Product"),
        "ListProducts": unary(list_products, "ListProductsRequest", "ListProductsResponse"),
        "Echo": unary(echo, "Product", "Product"),
        "Refuse": unary(refuse, "RefuseRequest", "Product"),
    }
    for name in extra:

        async def added(request: Any, context: Any, name: str = name) -> Any:
            seen(name, request, context)
            return request

        methods[name] = unary(added, "Product", "Product")
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def _bad_reflection(kind: Reflection, files: descriptor_pb2.FileDescriptorSet) -> Any:
    """Reflection (v1 and v1alpha) that hangs, answers garbage, serves a file without the files
    it imports, or answers every file asked for with more files importing more."""
    shop = next(file for file in files.file if file.name == "shop/v1/shop.proto")

    async def info(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for raw in requests:
            request = reflection_pb2.ServerReflectionRequest.FromString(raw)
            if kind == "hang":
                await asyncio.Event().wait()
            if kind == "garbage":
                yield b"\xff\xff\xff\xff"
                continue
            answer = reflection_pb2.ServerReflectionResponse(original_request=request)
            if request.HasField("list_services"):
                answer.list_services_response.service.add(name=SERVICE)
            elif request.HasField("file_containing_symbol"):
                answer.file_descriptor_response.file_descriptor_proto.append(
                    shop.SerializeToString()
                )
            elif kind == "endless":  # every file asked for comes with 100 that import more
                asked = request.file_by_filename
                answer.file_descriptor_response.file_descriptor_proto.extend(
                    descriptor_pb2.FileDescriptorProto(
                        name=f"{asked}.{i}", dependency=[f"{asked}.{i}.a", f"{asked}.{i}.b"]
                    ).SerializeToString()
                    for i in range(100)
                )
            else:
                answer.error_response.error_code = grpc.StatusCode.NOT_FOUND.value[0]
            yield answer.SerializeToString()

    handler = grpc.stream_stream_rpc_method_handler(info)
    return [
        grpc.method_handlers_generic_handler(
            f"{package}.ServerReflection", {"ServerReflectionInfo": handler}
        )
        for package in ("grpc.reflection.v1", "grpc.reflection.v1alpha")
    ]


@contextlib.asynccontextmanager
async def catalog_upstream(
    descriptor_set: bytes,
    reflection_kind: Reflection = "v1alpha",
    extra_methods: tuple[str, ...] = (),
    port: int = 0,
) -> AsyncIterator[Catalog]:
    """The Catalog of ``descriptor_set`` (the compiled file's bytes) on 127.0.0.1 (``port``: 0
    for any), with reflection as ``reflection_kind``
    says: grpcio-reflection's own (v1alpha only), none, or a hostile one."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set)
    for name in extra_methods:
        with_method(files, name)
    pool, classes = _classes(files)
    recorder = Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_catalog_handler(recorder, classes, extra_methods),))
    if reflection_kind == "v1alpha":
        reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), server, pool=pool)
    elif reflection_kind != "none":
        server.add_generic_rpc_handlers(_bad_reflection(reflection_kind, files))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield Catalog(port=bound, recorder=recorder, classes=classes, pool=pool)
    finally:
        await server.stop(None)
