"""The gRPC server: the Aggregator service wired with health, reflection and upstream pools.

``AggregatorServer`` owns everything with a lifetime (the grpc.aio server, one pool per
upstream) and shuts down as SPEC §5 says: NOT_SERVING, refuse new calls, drain within
``server.shutdown_grace``, close the pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import uuid
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aggregator.config import Config
from aggregator.errors import CallFailure
from aggregator.fanout import Aggregation, Budget
from aggregator.plan import make_plan
from aggregator.trailers import trailers
from aggregator.upstreams import Upstream, open_upstreams
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc

log = logging.getLogger("aggregator")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class AggregatorService(pb_grpc.AggregatorServicer):
    """Aggregate and Collect; the one place where failures become gRPC statuses."""

    def __init__(self, config: Config, upstreams: dict[str, Upstream]) -> None:
        self._config = config
        self._upstreams = upstreams
        self._loop = asyncio.get_running_loop()
        self.inflight = 0
        self.draining = False

    def __repr__(self) -> str:
        state = "draining" if self.draining else "serving"
        return f"<AggregatorService [{state}, {self.inflight} calls in flight]>"

    async def Aggregate(
        self, request: pb.AggregateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[pb.TargetResult]:
        async with contextlib.aclosing(self._run(request, context)) as results:
            async for result in results:
                yield result

    async def Collect(
        self, request: pb.AggregateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CollectResponse:
        response = pb.CollectResponse()
        async with contextlib.aclosing(self._run(request, context)) as results:
            async for result in results:
                response.results.append(result)
                _merge(response.merged, result)
        return response

    async def _run(
        self, request: pb.AggregateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[pb.TargetResult]:
        budget = Budget.for_call(context.time_remaining(), self._config.server, self._loop.time())
        request_id = _request_id(context)
        await context.send_initial_metadata((("x-request-id", request_id),))
        reported: dict[str, pb.TargetResult] = {}
        failure: CallFailure | None = None
        try:
            with self._admission():
                aggregation = Aggregation(
                    make_plan(request, self._config), self._upstreams, budget, request_id
                )
                reported = aggregation.reported
                async with contextlib.aclosing(aggregation.results()) as results:
                    async for result in results:
                        yield result
                failure = aggregation.failure
        except CallFailure as refused:
            failure = refused
        elapsed = self._loop.time() - budget.started
        context.set_trailing_metadata(trailers(reported.values(), budget.seconds, elapsed))
        if failure is not None:
            await context.abort(failure.code, failure.message)

    @contextlib.contextmanager
    def _admission(self) -> Iterator[None]:
        if self.draining:
            raise CallFailure(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        limit = self._config.server.max_concurrent_calls
        if self.inflight >= limit:
            raise CallFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than server.max_concurrent_calls ({limit}) calls in flight",
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


def _merge(merged: struct_pb2.Struct, result: pb.TargetResult) -> None:
    if result.outcome != pb.OUTCOME_OK:
        return
    if result.HasField("json"):
        merged.fields[result.id].CopyFrom(result.json)
        return
    if result.body:
        with contextlib.suppress(json_format.ParseError):
            json_format.Parse(result.body, merged.fields[result.id])
            return
        del merged.fields[result.id]


class AggregatorServer:
    """The running service. ``start()`` binds; ``drain()`` shuts down as SPEC §5 says."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._upstreams: dict[str, Upstream] = {}
        self._service: AggregatorService | None = None

    def __repr__(self) -> str:
        return (
            f"<AggregatorServer :{self.port} {self._service!r} [{len(self._upstreams)} upstreams]>"
        )

    async def start(self, address: str | None = None) -> int:
        """Binds ``address`` (default: server.address) and serves; returns the bound port."""
        server_config = self.config.server
        reuse_port = 1 if server_config.workers > 1 else 0
        self._server = grpc.aio.server(options=(("grpc.so_reuseport", reuse_port),))
        self._upstreams = open_upstreams(self.config.upstreams)
        self._service = AggregatorService(self.config, self._upstreams)
        pb_grpc.add_AggregatorServicer_to_server(self._service, self._server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME), self._server
        )
        address = address or server_config.address
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            await self._close_upstreams()
            raise OSError(f"cannot listen on {address}")
        await self._server.start()
        log.info("serving on %s (port %d)", address, self.port)
        return self.port

    async def drain(self) -> None:
        """NOT_SERVING, refuse new calls, finish in-flight ones within the grace, close pools."""
        assert self._server is not None
        assert self._service is not None
        grace = self.config.server.shutdown_grace
        log.info("draining: %d calls in flight, grace %gs", self._service.inflight, grace)
        await self._health.enter_graceful_shutdown()
        self._service.draining = True
        try:
            await self._server.stop(grace)
        finally:
            await self._close_upstreams()
        log.info("stopped")

    async def _close_upstreams(self) -> None:
        await asyncio.gather(*(upstream.aclose() for upstream in self._upstreams.values()))


async def serve(config: Config) -> None:
    """Runs until SIGTERM or SIGINT, then drains."""
    server = AggregatorServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.drain()
