"""The seam every kind of upstream implements, so policies wrap any upstream the same way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aggregator.config import UpstreamConfig
from aggregator.metrics import UpstreamMetrics
from aggregator.request import GrpcRequest, HttpRequest

if TYPE_CHECKING:
    from aggregator.upstreams.descriptors import Descriptors
    from aggregator.upstreams.fleet import Fleet, Resolver


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


def open_upstreams(
    configs: Mapping[str, UpstreamConfig],
    metrics: Mapping[str, UpstreamMetrics] | None = None,
    resolver: Resolver | None = None,
) -> dict[str, Upstream]:
    """Builds every configured upstream; call inside the running event loop. An upstream of
    one IP address is called directly; any other is a Fleet of endpoints (SPEC §12)."""
    return {
        name: open_upstream(config, None if metrics is None else metrics[name], resolver)
        for name, config in configs.items()
    }


def open_upstream(
    config: UpstreamConfig, metrics: UpstreamMetrics | None = None, resolver: Resolver | None = None
) -> Upstream:
    from aggregator.upstreams.fleet import Fleet, FleetMetrics, entries, system_resolver
    from aggregator.upstreams.grpc import GrpcUpstream
    from aggregator.upstreams.http import HttpUpstream

    found = entries(config)
    if len(found) == 1 and found[0].literal:  # no balancing: today's path, untouched
        return HttpUpstream(config) if config.kind == "http" else GrpcUpstream(config)

    def open_member(entry: str, address: str) -> Upstream:
        if config.kind == "http":
            return HttpUpstream(config, entry, connect_to=address)
        return GrpcUpstream(config, entry, connect_to=address)

    fleet_metrics = None
    if metrics is not None:
        fleet_metrics = FleetMetrics(
            metrics.endpoints_active.set, metrics.endpoints_ejected.set, metrics.ejections.inc
        )
    fleet = Fleet(config, open_member, resolver or system_resolver, fleet_metrics)
    if config.kind == "grpc":
        fleet.descriptors = _fleet_descriptors(fleet, config)
    return fleet


def _fleet_descriptors(fleet: Fleet, config: UpstreamConfig) -> Descriptors:
    """A gRPC fleet's descriptors: from its file, or the reflection of one of its endpoints."""
    import asyncio

    from aggregator.schema import Schema, load_descriptor_set
    from aggregator.upstreams.descriptors import Descriptors
    from aggregator.upstreams.grpc import GrpcUpstream

    if config.descriptors != "reflection":
        return Descriptors(config.name, schema=load_descriptor_set(config.descriptors))

    async def reflected() -> Schema:
        deadline = asyncio.get_running_loop().time() + config.timeout
        member = await fleet.choose((), deadline)
        try:
            assert isinstance(member.upstream, GrpcUpstream)
            return await member.upstream.reflected()
        finally:
            fleet.done(member, None)

    return Descriptors(config.name, fetch=reflected)
