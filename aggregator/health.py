"""grpc.health.v1 as grpcio-health-checking serves it, plus ``List``.

The async servicer grpcio ships answers ``Check`` and ``Watch`` but not ``List`` (added to the
protocol in 2024): grpc's generated base class would raise NotImplementedError, which a caller
sees as UNKNOWN "Unexpected <class 'NotImplementedError'>". ``List`` answers every registered
service and its status, as the protocol describes it.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

# The protocol lets a server refuse a List longer than this (RESOURCE_EXHAUSTED).
MAX_LISTED = 100


class Health(health.aio.HealthServicer):  # type: ignore[misc, name-defined]
    """grpcio-health-checking's async servicer, with ``List``."""

    def __repr__(self) -> str:
        return f"<Health {dict(self._server_status)}>"

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        statuses = dict(self._server_status)
        if len(statuses) > MAX_LISTED:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"more than {MAX_LISTED} services"
            )
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )
