"""A typed gRPC method for the grpc5-json/grpc5-bytes scenarios: ``/bench.v1.Quotes/Get``.

Its messages are described here (a FileDescriptorProto made in code: nothing to compile) and the
bench upstream serves them through grpcio-reflection, so the aggregator learns them as it would
from any upstream. ``QuoteRequest`` carries the delay; ``Quote`` is product-sized, with the
field kinds the JSON mapping works hardest on (int64, enum, repeated, nested, Timestamp).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

SERVICE = "bench.v1.Quotes"
METHOD = f"/{SERVICE}/Get"
_T = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="bench/v1/quote.proto",
        package="bench.v1",
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    file.enum_type.add(name="Tier").value.extend(
        [
            descriptor_pb2.EnumValueDescriptorProto(name="TIER_UNSPECIFIED", number=0),
            descriptor_pb2.EnumValueDescriptorProto(name="TIER_GOLD", number=1),
        ]
    )
    money = file.message_type.add(name="Money")
    _fields(money, ("currency_code", _T.TYPE_STRING), ("units", _T.TYPE_INT64),
            ("nanos", _T.TYPE_INT32))  # fmt: skip
    request = file.message_type.add(name="QuoteRequest")
    _fields(request, ("sku", _T.TYPE_STRING), ("delay_ms", _T.TYPE_INT32),
            ("locale", _T.TYPE_STRING), ("quantity", _T.TYPE_INT64))  # fmt: skip
    quote = file.message_type.add(name="Quote")
    _fields(
        quote,
        ("sku", _T.TYPE_STRING),
        ("name", _T.TYPE_STRING),
        ("price", _T.TYPE_MESSAGE, ".bench.v1.Money"),
        ("tier", _T.TYPE_ENUM, ".bench.v1.Tier"),
        ("stock", _T.TYPE_INT64),
        ("updated_at", _T.TYPE_MESSAGE, ".google.protobuf.Timestamp"),
    )
    quote.field.add(name="tags", number=7, type=_T.TYPE_STRING, label=_T.LABEL_REPEATED)
    service = file.service.add(name="Quotes")
    service.method.add(name="Get", input_type=".bench.v1.QuoteRequest",
                       output_type=".bench.v1.Quote")  # fmt: skip
    return file


def _fields(message: Any, *fields: tuple[Any, ...]) -> None:
    for number, (name, kind, *type_name) in enumerate(fields, start=1):
        field = message.field.add(name=name, number=number, type=kind, label=_T.LABEL_OPTIONAL)
        if type_name:
            field.type_name = type_name[0]


@cache
def pool() -> descriptor_pool.DescriptorPool:
    """A pool of its own (the default pool holds the aggregator's own messages)."""
    made = descriptor_pool.DescriptorPool()
    made.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    made.AddSerializedFile(_file().SerializeToString())
    return made


def message_class(name: str) -> Any:
    return message_factory.GetMessageClass(pool().FindMessageTypeByName(f"bench.v1.{name}"))


def request_json(ms: float) -> dict[str, Any]:
    """The QuoteRequest of a target, in its JSON mapping."""
    return {"sku": "A-1042", "delayMs": int(ms), "locale": "en-GB", "quantity": "2"}


def request_bytes(ms: float) -> bytes:
    return bytes(message_class("QuoteRequest")(sku="A-1042", delay_ms=int(ms), locale="en-GB",
                                               quantity=2).SerializeToString())  # fmt: skip


@cache
def answer() -> bytes:
    quote = message_class("Quote")(
        sku="A-1042", name="Trail running shoe", tier=1, stock=9007199254740993, tags=["x"] * 40
    )
    quote.price.currency_code, quote.price.units, quote.price.nanos = "EUR", 129, 0
    quote.updated_at.FromJsonString("2024-05-01T12:00:00Z")
    return bytes(quote.SerializeToString())
