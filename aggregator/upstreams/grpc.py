"""gRPC upstreams: one long-lived grpc.aio channel per upstream; request bytes pass through."""

from __future__ import annotations

import grpc

from aggregator.config import UpstreamConfig
from aggregator.errors import TargetFailure
from aggregator.plan import GrpcRequest, HttpRequest
from aggregator.upstreams import Reply
from aggregator.v1 import aggregator_pb2 as pb

_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


def _channel_options(config: UpstreamConfig) -> tuple[tuple[str, int], ...]:
    # gRPC core gives each connection attempt max(min_reconnect_backoff, current backoff):
    # the minimum is what bounds a connect, so it carries connect_timeout.
    connect_ms = max(1, round(config.connect_timeout * 1000))
    return (
        *_CHANNEL_OPTIONS,
        ("grpc.min_reconnect_backoff_ms", connect_ms),
        ("grpc.initial_reconnect_backoff_ms", min(connect_ms, 1_000)),
    )


class GrpcUpstream:
    """Passes serialized requests to one configured address and returns raw responses."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.name = config.name
        self._address = config.address
        self._channel = grpc.aio.insecure_channel(config.address, options=_channel_options(config))
        # Method names come from callers: the cache is bounded so they cannot grow it forever.
        self._methods: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    def __repr__(self) -> str:
        return f"<GrpcUpstream {self.name} {self._address} [{len(self._methods)} methods]>"

    async def call(
        self, request: HttpRequest | GrpcRequest, timeout: float, request_id: str
    ) -> Reply:
        assert isinstance(request, GrpcRequest)
        metadata = (*request.metadata, ("x-request-id", request_id))
        try:
            body = await self._method(request.method)(
                request.request, timeout=timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            return _failed_reply(self.name, exc)
        return Reply(ok=True, body=body, grpc_code=grpc.StatusCode.OK.value[0])

    def _method(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        callable_ = self._methods.get(method)
        if callable_ is None:
            if len(self._methods) >= 1024:
                self._methods.clear()
            # No serializers: grpc passes the bytes through untouched in both directions.
            callable_ = self._channel.unary_unary(
                method, request_serializer=None, response_deserializer=None
            )
            self._methods[method] = callable_
        return callable_

    async def aclose(self) -> None:
        await self._channel.close(None)


def _failed_reply(name: str, exc: grpc.aio.AioRpcError) -> Reply:
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        raise TargetFailure(
            pb.OUTCOME_UNAVAILABLE, f"{name} is unavailable: {details}", grpc_code=code.value[0]
        ) from exc
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise TargetFailure(
            pb.OUTCOME_TIMEOUT,
            f"{name} did not answer within the deadline sent to it",
            grpc_code=code.value[0],
        ) from exc
    return Reply(ok=False, body=b"", grpc_code=code.value[0], reason=f"gRPC {code.name}: {details}")
