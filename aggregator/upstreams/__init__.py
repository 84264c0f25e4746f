"""Upstreams: each kind's transport (http.py, grpc.py), the fleet of endpoints a name resolves
to (fleet.py), and ``open_upstreams``, which builds them from the config. The seam they share,
``Reply`` and ``Upstream``, is in seam.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from aggregator.config import UpstreamConfig
from aggregator.metrics import UpstreamMetrics
from aggregator.schema import load_descriptor_set
from aggregator.timers import SYSTEM_CLOCK, Clock
from aggregator.upstreams.descriptors import Descriptors, Reflected
from aggregator.upstreams.fleet import (
    Fleet,
    FleetMetrics,
    Resolver,
    Single,
    entries,
    system_resolver,
)
from aggregator.upstreams.grpc import GrpcUpstream
from aggregator.upstreams.http import HttpUpstream
from aggregator.upstreams.seam import Balancer, Reply, Upstream

__all__ = ["Balancer", "Reply", "Upstream", "open_upstream", "open_upstreams"]


def open_upstreams(
    configs: Mapping[str, UpstreamConfig],
    metrics: Mapping[str, UpstreamMetrics] | None = None,
    resolver: Resolver | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> dict[str, Balancer]:
    """Builds every configured upstream; call inside the running event loop. An upstream of
    one IP address is called directly; any other is a Fleet of endpoints (docs/fleet.md)."""
    return {
        name: open_upstream(config, None if metrics is None else metrics[name], resolver, clock)
        for name, config in configs.items()
    }


def open_upstream(
    config: UpstreamConfig,
    metrics: UpstreamMetrics | None = None,
    resolver: Resolver | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Balancer:
    descriptors = _descriptors(config) if config.kind == "grpc" else None
    pools = None if metrics is None else metrics.connections
    found = entries(config)
    if len(found) == 1 and found[0].literal:  # one endpoint, never ejected
        if metrics is not None:  # one endpoint, always active (docs/operations.md)
            metrics.endpoints_active.set(1)
        if config.kind == "http":
            return Single(HttpUpstream(config, clock=clock, pools=pools))
        return Single(GrpcUpstream(config), descriptors)

    def open_member(entry: str, address: str) -> Upstream:
        if config.kind == "http":
            return HttpUpstream(config, entry, connect_to=address, clock=clock, pools=pools)
        return GrpcUpstream(config, entry, connect_to=address)

    fleet_metrics = None
    if metrics is not None:
        fleet_metrics = FleetMetrics(
            metrics.endpoints_active.set, metrics.endpoints_ejected.set, metrics.ejections.inc
        )
    return Fleet(
        config, open_member, resolver or system_resolver, fleet_metrics, clock, descriptors
    )


def _descriptors(config: UpstreamConfig) -> Callable[[Balancer], Descriptors]:
    """A gRPC upstream's descriptors: from its file, or the reflection of one of its endpoints
    (made with the balancer, which picks that endpoint)."""
    if config.descriptors != "reflection":
        schema = load_descriptor_set(config.descriptors)
        return lambda balancer: Descriptors(config.name, schema=schema)

    def reflecting(balancer: Balancer) -> Descriptors:
        async def reflected() -> Reflected:
            deadline = asyncio.get_running_loop().time() + config.timeout
            member = await balancer.choose((), deadline)
            try:
                assert isinstance(member.upstream, GrpcUpstream)
                return await member.upstream.reflected()
            finally:
                balancer.done(member, None)

        return Descriptors(config.name, fetch=reflected)

    return reflecting
