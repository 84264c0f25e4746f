"""grpc.health.v1 as grpcio-health-checking serves it, with ``List`` and with Watch streams that
end with the drain (docs/operations.md, "Health and Kubernetes").

- The async servicer grpcio ships answers ``Check`` and ``Watch`` but not ``List`` (added to the
  protocol in 2024): grpc's generated base class would raise NotImplementedError, which a caller
  sees as UNKNOWN "Unexpected <class 'NotImplementedError'>". ``List`` answers every registered
  service and its status, as the protocol describes it.
- Its Watch streams stay open until the caller leaves: a probe or a mesh watching the server
  would hold grpc's stop for the whole ``server.shutdown_grace`` after the last real call ended
  (20.3 s measured with a grace of 20 s). Here ``end_watches()`` ends every Watch once it has
  sent the status in force (NOT_SERVING while draining), and a Watch that starts after it
  answers once and ends. Check is grpcio's own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

# The protocol lets a server refuse a List longer than this (RESOURCE_EXHAUSTED).
MAX_LISTED = 100

_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health(health.aio.HealthServicer):  # type: ignore[misc, name-defined]
    """grpcio-health-checking's async servicer, with ``List`` and Watch streams that end."""

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {}  # what Watch sends: as set(), NOT_SERVING once draining
        self._shutting_down = False
        self._ended = False
        self._changed = asyncio.Event()  # replaced at each change: a Watch waits on the one it saw

    def __repr__(self) -> str:
        state = "ended" if self._ended else "draining" if self._shutting_down else "serving"
        return f"<Health {state} {self._statuses}>"

    async def set(self, service: str, status: int) -> None:
        if not self._shutting_down:
            self._statuses[service] = status
            self._notify()
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self._shutting_down = True
        self._statuses = dict.fromkeys(self._statuses, _NOT_SERVING)
        self._notify()
        await super().enter_graceful_shutdown()

    def end_watches(self) -> None:
        """Every Watch sends the status in force, if it has not yet, and ends."""
        self._ended = True
        self._notify()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        sent = None
        while True:
            changed = self._changed  # taken before the status: a change after it wakes us
            status = self._statuses.get(request.service, _UNKNOWN)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            elif self._ended:
                return
            else:
                await changed.wait()

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

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
