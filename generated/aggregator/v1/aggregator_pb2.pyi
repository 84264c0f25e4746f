import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_OK: _ClassVar[Outcome]
    OUTCOME_ERROR: _ClassVar[Outcome]
    OUTCOME_TIMEOUT: _ClassVar[Outcome]
    OUTCOME_UNAVAILABLE: _ClassVar[Outcome]
    OUTCOME_CIRCUIT_OPEN: _ClassVar[Outcome]
    OUTCOME_REJECTED: _ClassVar[Outcome]
    OUTCOME_SKIPPED: _ClassVar[Outcome]
    OUTCOME_CANCELLED: _ClassVar[Outcome]

class CacheStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_STATUS_UNSPECIFIED: _ClassVar[CacheStatus]
    CACHE_STATUS_MISS: _ClassVar[CacheStatus]
    CACHE_STATUS_HIT: _ClassVar[CacheStatus]
    CACHE_STATUS_STALE: _ClassVar[CacheStatus]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_OK: Outcome
OUTCOME_ERROR: Outcome
OUTCOME_TIMEOUT: Outcome
OUTCOME_UNAVAILABLE: Outcome
OUTCOME_CIRCUIT_OPEN: Outcome
OUTCOME_REJECTED: Outcome
OUTCOME_SKIPPED: Outcome
OUTCOME_CANCELLED: Outcome
CACHE_STATUS_UNSPECIFIED: CacheStatus
CACHE_STATUS_MISS: CacheStatus
CACHE_STATUS_HIT: CacheStatus
CACHE_STATUS_STALE: CacheStatus

class AggregateRequest(_message.Message):
    __slots__ = ("targets", "aggregate", "params")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    aggregate: str
    params: _struct_pb2.Struct
    def __init__(self, targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ..., aggregate: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListAggregatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAggregatesResponse(_message.Message):
    __slots__ = ("aggregates",)
    AGGREGATES_FIELD_NUMBER: _ClassVar[int]
    aggregates: _containers.RepeatedCompositeFieldContainer[AggregateInfo]
    def __init__(self, aggregates: _Optional[_Iterable[_Union[AggregateInfo, _Mapping]]] = ...) -> None: ...

class AggregateInfo(_message.Message):
    __slots__ = ("name", "description", "params", "target_ids")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TARGET_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    params: _containers.RepeatedCompositeFieldContainer[AggregateParam]
    target_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., params: _Optional[_Iterable[_Union[AggregateParam, _Mapping]]] = ..., target_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AggregateParam(_message.Message):
    __slots__ = ("name", "required", "default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    required: bool
    default: _struct_pb2.Value
    def __init__(self, name: _Optional[str] = ..., required: _Optional[bool] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("id", "http", "grpc", "required", "timeout", "depends_on", "fallback", "decode_json", "for_each")
    ID_FIELD_NUMBER: _ClassVar[int]
    HTTP_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    DECODE_JSON_FIELD_NUMBER: _ClassVar[int]
    FOR_EACH_FIELD_NUMBER: _ClassVar[int]
    id: str
    http: HttpCall
    grpc: GrpcCall
    required: bool
    timeout: _duration_pb2.Duration
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    fallback: _struct_pb2.Value
    decode_json: bool
    for_each: str
    def __init__(self, id: _Optional[str] = ..., http: _Optional[_Union[HttpCall, _Mapping]] = ..., grpc: _Optional[_Union[GrpcCall, _Mapping]] = ..., required: _Optional[bool] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., depends_on: _Optional[_Iterable[str]] = ..., fallback: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., decode_json: _Optional[bool] = ..., for_each: _Optional[str] = ...) -> None: ...

class HttpCall(_message.Message):
    __slots__ = ("upstream", "method", "path", "query", "headers", "body", "json")
    class QueryEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    method: str
    path: str
    query: _containers.ScalarMap[str, str]
    headers: _containers.ScalarMap[str, str]
    body: bytes
    json: _struct_pb2.Value
    def __init__(self, upstream: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., query: _Optional[_Mapping[str, str]] = ..., headers: _Optional[_Mapping[str, str]] = ..., body: _Optional[bytes] = ..., json: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class GrpcCall(_message.Message):
    __slots__ = ("upstream", "method", "request", "metadata", "json")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    method: str
    request: bytes
    metadata: _containers.ScalarMap[str, str]
    json: _struct_pb2.Value
    def __init__(self, upstream: _Optional[str] = ..., method: _Optional[str] = ..., request: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ..., json: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class TargetResult(_message.Message):
    __slots__ = ("id", "outcome", "http_status", "grpc_code", "body", "content_type", "json", "error", "attempts", "start_offset", "latency", "cache", "from_fallback")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    GRPC_CODE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    FROM_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    id: str
    outcome: Outcome
    http_status: int
    grpc_code: int
    body: bytes
    content_type: str
    json: _struct_pb2.Value
    error: str
    attempts: int
    start_offset: _duration_pb2.Duration
    latency: _duration_pb2.Duration
    cache: CacheStatus
    from_fallback: bool
    def __init__(self, id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., http_status: _Optional[int] = ..., grpc_code: _Optional[int] = ..., body: _Optional[bytes] = ..., content_type: _Optional[str] = ..., json: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., error: _Optional[str] = ..., attempts: _Optional[int] = ..., start_offset: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cache: _Optional[_Union[CacheStatus, str]] = ..., from_fallback: _Optional[bool] = ...) -> None: ...

class CollectResponse(_message.Message):
    __slots__ = ("results", "merged")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TargetResult]
    merged: _struct_pb2.Struct
    def __init__(self, results: _Optional[_Iterable[_Union[TargetResult, _Mapping]]] = ..., merged: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class AggregateSummary(_message.Message):
    __slots__ = ("targets", "succeeded", "failed", "timed_out", "fallback", "failures", "failures_omitted")
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_OMITTED_FIELD_NUMBER: _ClassVar[int]
    targets: int
    succeeded: int
    failed: int
    timed_out: int
    fallback: int
    failures: _containers.RepeatedCompositeFieldContainer[TargetSummary]
    failures_omitted: int
    def __init__(self, targets: _Optional[int] = ..., succeeded: _Optional[int] = ..., failed: _Optional[int] = ..., timed_out: _Optional[int] = ..., fallback: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[TargetSummary, _Mapping]]] = ..., failures_omitted: _Optional[int] = ...) -> None: ...

class TargetSummary(_message.Message):
    __slots__ = ("id", "outcome", "latency")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    id: str
    outcome: Outcome
    latency: _duration_pb2.Duration
    def __init__(self, id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
