"""The seam every kind of upstream implements, so policies wrap any upstream the same way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from aggregator.config import UpstreamConfig
from aggregator.plan import GrpcRequest, HttpRequest


@dataclass(frozen=True, slots=True)
class Reply:
    """What an upstream answered, good or bad. Transport failures raise TargetFailure instead."""

    ok: bool
    body: bytes
    http_status: int = 0
    grpc_code: int = 0
    content_type: str = ""
    # Why a reply that is not ok is not ok, as a sentence fragment ("HTTP 503", ...).
    reason: str = ""
    # Seconds the upstream asked us to wait before retrying (HTTP Retry-After).
    retry_after: float | None = None
    cache_control: str = ""


class Upstream(Protocol):
    """One configured upstream: owns its connections for the server's lifetime."""

    name: str

    async def call(
        self, request: HttpRequest | GrpcRequest, timeout: float, request_id: str
    ) -> Reply:
        """Makes one attempt; raises TargetFailure when no answer came back."""
        ...

    async def aclose(self) -> None: ...


def open_upstreams(configs: Mapping[str, UpstreamConfig]) -> dict[str, Upstream]:
    """Builds every configured upstream; call inside the running event loop."""
    from aggregator.upstreams.grpc import GrpcUpstream
    from aggregator.upstreams.http import HttpUpstream

    return {
        name: HttpUpstream(config) if config.kind == "http" else GrpcUpstream(config)
        for name, config in configs.items()
    }
