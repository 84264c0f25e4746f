"""The process around the service: ``AggregatorServer`` owns everything with a lifetime (the
grpc.aio server, the plaintext health-only server, /metrics, the admin page, one pool per
upstream, the reloader) and shuts down as docs/operations.md says: NOT_SERVING, refuse new
calls, drain within ``server.shutdown_grace``, close the pools. ``run``/``serve`` start it on
the configured event loop (cli.py, workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from aggregator import tracing
from aggregator.admin.app import make_app
from aggregator.admin.group import Group
from aggregator.admin.recent import Recent
from aggregator.config import Config, UpstreamConfig
from aggregator.health import Health
from aggregator.metrics import Metrics
from aggregator.offload import Offload
from aggregator.policies.endpoint import GuardedUpstream
from aggregator.policies.global_limits import SharedLimits
from aggregator.policies.limits import Bulkhead
from aggregator.policies.quotas import Quotas
from aggregator.reflection import enable_reflection
from aggregator.reload import ConfigFile, Reloader
from aggregator.security.tls import ServerCertificates
from aggregator.server import SERVICE_NAME, AggregatorService, add_aggregator
from aggregator.timers import SYSTEM_CLOCK, Clock, Timers
from aggregator.upstreams import open_upstream
from aggregator.upstreams.descriptors import Descriptors

log = logging.getLogger("aggregator")

HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_MIN_BACKLOG = 10_000  # calls received, not yet taken by the loop (_server_options)


class AggregatorServer:
    """The running service. ``start()`` binds; ``drain()`` shuts down as docs/operations.md says."""

    def __init__(
        self,
        config: Config,
        registry: CollectorRegistry | None = None,
        source: ConfigFile | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config  # as at start; a reload's is the service's state.config
        # The file it came from, with its named aggregates planned: reloadable when given.
        self._source = source
        self._catalog = source.catalog if source is not None else None
        self.reloader: Reloader | None = None
        self._clock = clock  # the upstreams' policies' time (tests pass one they advance)
        self._timers: Timers | None = None  # one for all upstreams (made in the loop, at start)
        self.port = 0
        self.metrics_port = 0
        callers = config.auth.callers if config.auth else ()
        self.metrics = Metrics(
            registry or CollectorRegistry(), config.upstreams, config.aggregates, callers
        )
        self.shared_limits: SharedLimits | None = None  # limits.backend: redis, made in start()
        self.health_port = 0
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self._health = Health()
        self._certificates = ServerCertificates(config.server.tls) if config.server.tls else None
        limit = config.server.max_upstream_inflight
        self.upstream_inflight = Bulkhead(
            "all upstreams",
            limit,
            f"{limit} upstream calls in flight (server.max_upstream_inflight) "
            "and none finished in time",
        )
        self._service: AggregatorService | None = None
        self.offload = Offload()  # CPU-bound work too large for the loop
        self._metrics_runner: web.AppRunner | None = None
        self.admin_port = 0
        self._admin_runner: web.AppRunner | None = None
        admin = config.server.admin_address
        # With workers, the admin page shows every worker's records (admin/group.py).
        self._group = Group.from_environ(config.server.workers) if admin else None
        worker = (self._group.index, self._group.size) if self._group else (0, 1)
        self.recent = (
            Recent(config.server.admin_recent, config.upstreams, worker=worker) if admin else None
        )
        self._peer_runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return (
            f"<AggregatorServer :{self.port} {self._service!r} [{len(self.endpoints)} upstreams]>"
        )

    async def start(self) -> int:
        """Binds server.address (and metrics_address) and serves; returns the bound port."""
        server_config = self.config.server
        self._server = grpc.aio.server(
            options=(
                *self._server_options(),
                # Refused by grpc itself, before a handler runs: RESOURCE_EXHAUSTED.
                ("grpc.max_receive_message_length", server_config.max_request_bytes),
            )
        )
        # One for all upstreams: attempts that start together share a timer.
        self._timers = Timers()
        if self.config.limits.backend == "redis":
            self.shared_limits = SharedLimits(self.config.limits, self.metrics.limit_backend_errors)
        upstreams = self.config.upstreams
        opened = {name: self.open_endpoint(config) for name, config in upstreams.items()}
        endpoints = {name: endpoint for name, (endpoint, _) in opened.items()}
        descriptors = {name: found for name, (_, found) in opened.items() if found is not None}
        self._service = AggregatorService(
            self.config, endpoints, self.metrics, self.offload,
            catalog=self._catalog, descriptors=descriptors, recent=self.recent,
            quotas=Quotas(self.config.auth, self.shared_limits, self.metrics),
        )  # fmt: skip
        if self._source is not None:
            self.reloader = Reloader(
                self._source, self._service, self.open_endpoint, self.metrics.registry,
                self._applied,
            )  # fmt: skip
        add_aggregator(self._service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        enable_reflection(self._server, (SERVICE_NAME, HEALTH_NAME))
        try:
            self.port = self._listen(self._server, server_config.address, "server.address")
            if server_config.health_address:
                self.health_port = await self._serve_health(server_config.health_address)
            if server_config.metrics_address:
                self.metrics_port = await self._serve_metrics(server_config.metrics_address)
            if self.recent is not None:
                self.admin_port = await self._serve_admin(server_config.admin_address)
        except BaseException:
            await self._close_endpoints()
            raise
        await self._server.start()
        log.info("serving %s", self._listening())
        return self.port

    @property
    def endpoints(self) -> Mapping[str, GuardedUpstream]:
        """The upstreams in force (a reload may have changed them)."""
        return self._service.state.endpoints if self._service is not None else {}

    def open_endpoint(self, config: UpstreamConfig) -> tuple[GuardedUpstream, Descriptors | None]:
        """One upstream with its policies, and its descriptors when it is a gRPC upstream."""
        assert self._timers is not None, "open_endpoint before start"
        metrics = self.metrics.upstream(config.name)
        upstream = open_upstream(config, metrics, clock=self._clock)
        endpoint = GuardedUpstream(
            upstream, config, metrics, self.upstream_inflight, self._timers, self._clock,
            self.shared_limits,
        )  # fmt: skip
        return endpoint, upstream.descriptors

    def _applied(self, config: Config) -> None:
        """A reload's new config: its upstreams and aggregates get their metrics and admin
        records (names already known keep theirs); the upstreams the server closes at
        shutdown are the new ones (the reloader closes the retired)."""
        self.metrics.add_aggregates(config.aggregates)
        if self.recent is not None:
            self.recent.track(config.upstreams)

    def _listening(self) -> str:
        """Every port bound, as a newcomer needs them: ``gRPC on 127.0.0.1:50051 (plaintext),
        health on the gRPC port, metrics on http://127.0.0.1:9464/metrics, admin page on
        http://127.0.0.1:9465/``."""
        server_config = self.config.server
        security = "TLS" if self._certificates else "plaintext"
        parts = [f"gRPC on {_bound(server_config.address, self.port)} ({security})"]
        if self.health_port:
            health = _bound(server_config.health_address, self.health_port)
            parts.append(f"health on {health} (plaintext, grpc.health.v1 only)")
        else:
            parts.append("health on the gRPC port")
        if self.metrics_port:
            metrics = _bound(server_config.metrics_address, self.metrics_port)
            parts.append(f"metrics on http://{metrics}/metrics")
        else:
            parts.append("metrics off")
        if self.admin_port:
            admin = _bound(server_config.admin_address, self.admin_port)
            parts.append(f"admin page on http://{admin}/")
        else:
            parts.append("admin page off")
        return ", ".join(parts)

    def _server_options(self) -> tuple[tuple[str, int], ...]:
        # Calls grpc has received but the loop has not taken yet: past grpc's own limits (a
        # random share from 1,000, all from 3,000) it ends them CANCELLED, before any handler
        # could answer RESOURCE_EXHAUSTED (docs/operations.md, "Overload").
        backlog = max(_MIN_BACKLOG, 10 * self.config.server.max_concurrent_calls)
        return (
            ("grpc.so_reuseport", 1 if self.config.server.workers > 1 else 0),
            ("grpc.server.max_pending_requests", backlog),
            ("grpc.server.max_pending_requests_hard_limit", backlog),
        )

    def _listen(self, server: grpc.aio.Server, address: str, key: str) -> int:
        """Binds ``address``: with TLS (the server's certificates) when configured."""
        try:
            if self._certificates is not None and key == "server.address":
                port = server.add_secure_port(address, self._certificates.credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's way of saying the port is taken
            raise OSError(f"cannot listen on {key} {address}") from exc
        if port == 0:
            raise OSError(f"cannot listen on {key} {address}")
        return port

    async def _serve_health(self, address: str) -> int:
        """A plaintext server with grpc.health.v1 only: Kubernetes gRPC probes speak no TLS,
        and nothing else may be reachable without it."""
        self._health_server = grpc.aio.server(
            options=(*self._server_options(), ("grpc.max_receive_message_length", 1024))
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
        port = self._listen(self._health_server, address, "server.health_address")
        await self._health_server.start()
        return port

    async def _serve_metrics(self, address: str) -> int:
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler(self.metrics.exposition))
        self._metrics_runner = web.AppRunner(app, access_log=None)
        return await self._serve_http(self._metrics_runner, address, "server.metrics_address")

    async def _serve_admin(self, address: str) -> int:
        assert self.recent is not None
        hosts = (address.rpartition(":")[0], *self.config.server.admin_hosts)
        upstreams = _LiveEndpoints(self._service)
        info = self.reloader.admin_info if self.reloader is not None else None
        if self._group is not None:  # this worker's own records, for the others to merge
            peer = make_app(self.recent, upstreams, hosts, info, peer=True)
            self._peer_runner = web.AppRunner(peer, access_log=None, handler_cancellation=True)
            await self._peer_runner.setup()
            await web.UnixSite(self._peer_runner, self._group.socket).start()
        self._admin_runner = web.AppRunner(
            make_app(self.recent, upstreams, hosts, info, group=self._group),
            access_log=None,
            handler_cancellation=True,
        )
        return await self._serve_http(self._admin_runner, address, "server.admin_address")

    async def _serve_http(self, runner: web.AppRunner, address: str, key: str) -> int:
        await runner.setup()
        host, _, port = address.rpartition(":")
        reuse_port = self.config.server.workers > 1
        site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=reuse_port)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"cannot listen on {key} {address}: {exc.strerror}") from exc
        return int(runner.addresses[0][1])

    async def drain(self) -> None:
        """NOT_SERVING, refuse new calls, finish in-flight ones within the grace, close pools."""
        assert self._server is not None
        assert self._service is not None
        grace = self.config.server.shutdown_grace
        log.info("draining: %d calls in flight, grace %gs", self._service.inflight, grace)
        await self._health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        grace_ends_at = loop.time() + grace
        try:
            await self._service.drain(grace_ends_at)
            self._health.end_watches()  # an open Watch would hold the stop for the whole grace
            # What is still in flight now is cut when the grace ends (as UNAVAILABLE).
            await self._server.stop(max(0.0, grace_ends_at - loop.time()))
        finally:
            await self._close_endpoints()
        log.info("stopped")

    async def _close_endpoints(self) -> None:
        if self._health_server is not None:  # last: probes see NOT_SERVING until the end
            await self._health_server.stop(None)
        await asyncio.gather(*(endpoint.aclose() for endpoint in self.endpoints.values()))
        if self.reloader is not None:
            await self.reloader.aclose()
        if self.shared_limits is not None:
            await self.shared_limits.aclose()
        self.offload.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._peer_runner is not None:
            await self._peer_runner.cleanup()


def run(config: Config, source: ConfigFile | None = None) -> None:
    """Serves on the event loop ``server.event_loop`` names, until SIGTERM or SIGINT; reloads
    ``source`` on SIGHUP and when it changes."""
    with asyncio.Runner(loop_factory=event_loop_factory(config.server.event_loop)) as runner:
        runner.run(serve(config, source))


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``server.event_loop`` (None: asyncio's own)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise OSError("server.event_loop is uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


async def serve(config: Config, source: ConfigFile | None = None) -> None:
    """Runs until SIGTERM or SIGINT, then drains; reloads ``source`` (when given) on SIGHUP
    and when its content changes."""
    provider = _start_tracing(config)
    server = AggregatorServer(config, source=source)
    await server.start()
    _settle_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloader = server.reloader
    watching = None
    if reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
        watching = asyncio.create_task(reloader.watch(), name="config watch")
    try:
        await stop.wait()
    finally:
        if watching is not None:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
    await server.drain()
    if provider is not None:
        tracing.disable()
        provider.shutdown()  # flushes the spans still batched


def _settle_heap() -> None:
    """Tunes the garbage collector for a long-running server: what is alive after start-up
    (modules, pools, config) lives as long as the process, so it is frozen out of every later
    collection; and the young generation is collected less often, since each call allocates
    hundreds of short-lived containers. Measured: about 3% less CPU per aggregate."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _start_tracing(config: Config) -> Any:
    if config.tracing is None:
        return None
    settings = config.tracing
    try:
        provider = tracing.provider_for(
            settings.exporter, settings.endpoint, settings.service_name, settings.sample_ratio
        )
    except ImportError as exc:
        raise OSError(
            "tracing is configured but OpenTelemetry is missing: pip install 'aggregator[otel]'"
        ) from exc
    tracing.enable(provider)
    return provider


class _LiveEndpoints(Mapping[str, GuardedUpstream]):
    """The admin page's view of the upstreams: those of the state in force, whichever it is."""

    def __init__(self, service: AggregatorService | None) -> None:
        assert service is not None
        self._service = service

    def __getitem__(self, name: str) -> GuardedUpstream:
        return self._service.state.endpoints[name]  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[str]:
        return iter(self._service.state.endpoints)

    def __len__(self) -> int:
        return len(self._service.state.endpoints)


def _bound(address: str, port: int) -> str:
    """``address`` with the port actually bound (``127.0.0.1:0`` -> ``127.0.0.1:41169``)."""
    return f"{address.rpartition(':')[0]}:{port}"
