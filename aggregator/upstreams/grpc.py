"""gRPC upstreams: one long-lived grpc.aio channel per upstream; request bytes pass through."""

from __future__ import annotations

import asyncio

import grpc

from aggregator.config import UpstreamConfig
from aggregator.errors import TargetFailure
from aggregator.plan import GrpcRequest, HttpRequest
from aggregator.security import hops
from aggregator.security.files import Watched
from aggregator.security.tls import channel_credentials, upstream_files
from aggregator.upstreams.descriptors import REFLECTION, Reflected, fetch_by_reflection
from aggregator.upstreams.seam import Reply
from aggregator.upstreams.status_details import MAX_SIZE, clean, read_details
from aggregator.v1 import aggregator_pb2 as pb

_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)
# How grpc words a response over grpc.max_receive_message_length, made by our side of the
# channel ("Stream removed (CLIENT: Received message larger than max (2097152 vs. 1048576))").
_TOO_LARGE = "Received message larger than max"
_NO_CONNECTION = "failed to connect to all addresses"
# How gRPC servers answer a request whose bytes do not parse as the method's message: the
# caller's doing, never held against the upstream (policies/blame.py). grpc Python's sync
# server (INTERNAL), its asyncio server (UNKNOWN, protobuf's DecodeError), grpc-go (Internal),
# grpc-java (INTERNAL). Matched only in the upstream's own message, under INTERNAL or UNKNOWN.
_UNREADABLE_REQUEST = (
    "Exception deserializing request",
    "DecodeError'>: Error parsing message",
    "grpc: error unmarshalling request",
    "Invalid protobuf byte sequence",
)
_UNREADABLE_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# Method names come from callers: only short ones are kept, within a total size in characters
# (a longer name is valid, and gets a callable of its own for its call).
_CACHED_METHOD = 256
_METHODS_SIZE = 64 * 1024
_METHODS = 1024  # and at most this many callables


def _channel_options(config: UpstreamConfig) -> tuple[tuple[str, int], ...]:
    # gRPC core gives each connection attempt max(min_reconnect_backoff, current backoff):
    # the minimum is what bounds a connect, so it carries connect_timeout.
    connect_ms = max(1, round(config.connect_timeout * 1000))
    return (
        *_CHANNEL_OPTIONS,
        # grpc refuses a larger response before it is buffered whole: max_response_bytes.
        ("grpc.max_receive_message_length", config.max_response_bytes),
        ("grpc.min_reconnect_backoff_ms", connect_ms),
        ("grpc.initial_reconnect_backoff_ms", min(connect_ms, 1_000)),
    )


class GrpcUpstream:
    """Passes serialized requests to one configured address and returns raw responses."""

    def __init__(self, config: UpstreamConfig, address: str = "", connect_to: str = "") -> None:
        """``address``: one entry of the upstream's ``address`` (its first by default);
        ``connect_to``: the one IP address of it this channel connects to (a fleet's endpoint),
        while TLS and :authority keep the entry's name."""
        self.name = config.name
        self._config = config
        self._address = address or config.address
        self._target = self._address
        self._named: tuple[tuple[str, str], ...] = ()
        if connect_to:
            host, _, port = self._address.rpartition(":")
            self._target = f"{_bracketed(connect_to)}:{port}"
            self._named = (
                ("grpc.default_authority", self._address),
                ("grpc.ssl_target_name_override", host.strip("[]")),
            )
        tls = config.tls
        what = f"upstreams.{config.name}.tls"
        self._tls = (
            Watched(what, upstream_files(tls), lambda: channel_credentials(tls))
            if tls is not None
            else None
        )
        self._generation = 0
        self._channel = self._open_channel()
        # Channels replaced by a certificate rotation, closing once their calls are done.
        self._retiring: set[asyncio.Task[None]] = set()
        # Method names come from callers: the cache is bounded so they cannot grow it forever.
        self._methods: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}
        self._methods_size = 0  # characters of the names in _methods
        self._reflection = REFLECTION

    async def reflected(self) -> Reflected:
        """The upstream's descriptors from its reflection, within its timeout: the package
        that answered last time is asked first (grpcio-reflection serves v1alpha only)."""
        self._rotate_if_changed(self._config.timeout)
        reflected, package = await fetch_by_reflection(
            self._channel, self._config.timeout, self._reflection
        )
        if package != self._reflection[0]:
            self._reflection = (self._reflection[1], self._reflection[0])
        return reflected

    def __repr__(self) -> str:
        tls = f" tls {self._tls!r}" if self._tls is not None else ""
        cached = f"[{len(self._methods)} methods cached, {self._methods_size} chars]"
        return f"<GrpcUpstream {self.name} {self._address}{tls} {cached}>"

    def _open_channel(self) -> grpc.aio.Channel:
        options = (*_channel_options(self._config), *self._named)
        if self._tls is None:
            return grpc.aio.insecure_channel(self._target, options=options)
        credentials = self._tls.current()
        self._generation = self._tls.generation
        return grpc.aio.secure_channel(self._target, credentials, options=options)

    async def call(
        self, request: HttpRequest | GrpcRequest, timeout: float, request_id: str
    ) -> Reply:
        assert isinstance(request, GrpcRequest)
        self._rotate_if_changed(timeout)
        metadata = (*request.metadata, ("x-request-id", request_id), hops.outgoing())
        try:
            body = await self._method(request.method)(
                request.request, timeout=timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            return _failed_reply(self.name, exc, self._config.max_response_bytes)
        return Reply(ok=True, body=body, grpc_code=grpc.StatusCode.OK.value[0])

    def _rotate_if_changed(self, grace: float) -> None:
        """A new channel with the new certificates; the old one finishes its calls, then closes."""
        if self._tls is None:
            return
        self._tls.current()
        if self._tls.generation == self._generation:
            return
        old, self._channel = self._channel, self._open_channel()
        self._methods.clear()
        self._methods_size = 0
        task = asyncio.create_task(old.close(grace), name=f"retire channel {self.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _method(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        callable_ = self._methods.get(method)
        if callable_ is None:
            # No serializers: grpc passes the bytes through untouched in both directions.
            callable_ = self._channel.unary_unary(
                method, request_serializer=None, response_deserializer=None
            )
            if len(method) <= _CACHED_METHOD:
                full = len(self._methods) >= _METHODS
                if full or self._methods_size + len(method) > _METHODS_SIZE:
                    self._methods.clear()
                    self._methods_size = 0
                self._methods[method] = callable_
                self._methods_size += len(method)
        return callable_

    async def aclose(self) -> None:
        for task in self._retiring:
            task.cancel()
        if self._retiring:
            await asyncio.wait(self._retiring)
        await self._channel.close(None)


def _bracketed(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _never_sent(exc: grpc.aio.AioRpcError) -> bool:
    return (
        (exc.details() or "").startswith(_NO_CONNECTION)
        and not exc.initial_metadata()
        and not exc.trailing_metadata()
    )


def _unreadable_request(code: grpc.StatusCode, details: str) -> bool:
    return code in _UNREADABLE_CODES and any(words in details for words in _UNREADABLE_REQUEST)


def _failed_reply(name: str, exc: grpc.aio.AioRpcError, max_bytes: int) -> Reply:
    code = exc.code()
    # The upstream's own words, cleaned as its details are: one line, printable, bounded.
    details = clean(exc.details() or "", MAX_SIZE) or code.name
    unreadable = _unreadable_request(code, details)  # its own words, before its details
    extra = read_details(exc.trailing_metadata())
    if extra.words:  # the upstream's error details, after its own message
        details = f"{details} ({extra.words})"
    if code == grpc.StatusCode.UNAVAILABLE:
        raise TargetFailure(
            pb.OUTCOME_UNAVAILABLE,
            f"{name} is unavailable: {details}",
            grpc_code=code.value[0],
            retry_after=extra.retry_after,
            # grpc's own words when the channel had no connection: the call was never sent.
            # Read before the upstream's details are added, and only with nothing from the
            # upstream: a proxy passing those words on did receive the call.
            unsent=_never_sent(exc),
        ) from exc
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise TargetFailure(
            pb.OUTCOME_TIMEOUT,
            f"{name} did not answer within the deadline sent to it",
            grpc_code=code.value[0],
        ) from exc
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE in details:
        raise TargetFailure(
            pb.OUTCOME_ERROR,
            f"response too large: {name} sent a message over "
            f"upstreams.{name}.max_response_bytes ({max_bytes}): {details}",
            grpc_code=code.value[0],
        ) from exc
    return Reply(
        ok=False,
        body=b"",
        grpc_code=code.value[0],
        reason=f"gRPC {code.name}: {details}",
        retry_after=extra.retry_after,
        unreadable_request=unreadable,
    )
