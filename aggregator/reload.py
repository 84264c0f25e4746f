"""Live configuration (docs/operations.md, "Reloading the config"): SIGHUP, or a change of the
config file's content, reloads it without a restart.

The file is read and checked as at start (aggregator/load.py: the config, then its named
aggregates planned). A bad file changes nothing: its problems are logged, each with its key
path, and counted. A good one becomes a new ``State``, which every call takes at its start and
keeps to its end: new calls run with the new config at once, running ones finish with theirs.
An upstream whose settings are unchanged keeps its ``GuardedUpstream`` (connections, breaker, fleet,
limits, cache); one that changed gets a new one; an endpoint no State in use holds any more is
closed once the last call holding it has ended.

The file is looked at every ``server.config_check_interval`` and reloaded when its content's
SHA-256 differs from the last one tried: a Kubernetes ConfigMap is updated by swapping a
symlink, which an mtime on the path would not see, and a file rewritten with the same bytes is
no change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aggregator.aggregates import Catalog
from aggregator.config import Config, ConfigError, UpstreamConfig
from aggregator.config import read_file as read_config_file
from aggregator.load import Loaded, load_text
from aggregator.security.auth import Gate

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("aggregator")

# Keys read once, when the process starts (listeners are bound, workers forked, the loop and
# tracing set up, the grpc server built): a reload that changes one says it needs a restart and
# applies the rest.
RESTART_KEYS = (
    "server.address", "server.health_address", "server.metrics_address", "server.admin_address",
    "server.workers", "server.tls", "server.event_loop", "server.max_request_bytes",
    "server.max_upstream_inflight", "server.admin_recent", "server.admin_hosts",
    "server.admin_allow_remote", "server.log_format", "tracing", "limits",
)  # fmt: skip
# Callers' quotas keep their counters for the process's life (policies/quotas.py).
QUOTAS = "auth.callers.<name>.rate_limit and max_concurrent_calls"
RESULTS = ("ok", "error")


class Closeable(Protocol):
    async def aclose(self) -> None: ...


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def read(path: str) -> tuple[str, str]:
    """The config file's text and its SHA-256 (blocking: run it off the loop)."""
    text = read_config_file(path)
    return text, sha256(text)


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """The file ``aggregator serve`` loaded, and the hash of the text it loaded."""

    path: str
    sha256: str
    catalog: Catalog | None = None  # its named aggregates, planned when it was loaded


@dataclass(slots=True, eq=False)
class State:
    """What a call runs with, from its start to its end: one config and what was built for it.

    ``calls`` counts the calls holding it; ``on_idle`` runs when the last one of a retired
    State ends."""

    config: Config
    catalog: Catalog
    gate: Gate
    endpoints: Mapping[str, Any]  # upstream name: its policy stack (policies/endpoint.py)
    descriptors: Mapping[str, Any] = field(default_factory=dict)  # gRPC upstreams' schemas
    calls: int = 0
    on_idle: Callable[[State], None] | None = None

    def __repr__(self) -> str:
        retired = ", retired" if self.on_idle is not None else ""
        return f"<State [{len(self.endpoints)} upstreams, {self.calls} calls{retired}]>"

    def leave(self) -> None:
        """One call holding this State has ended."""
        self.calls -= 1
        if not self.calls and self.on_idle is not None:
            self.on_idle(self)


class Holder(Protocol):
    """Where the State in force lives (the gRPC service): read once by each call."""

    state: State


# The endpoint and, for a gRPC upstream, its descriptors, built for one upstream's config.
OpenEndpoint = Callable[[UpstreamConfig], tuple[Any, Any]]


@dataclass(slots=True)
class Outcome:
    """The last reload, as the admin page shows it."""

    at: float  # wall clock
    result: str  # ok | error
    sha256: str
    problems: int = 0
    needs_restart: tuple[str, ...] = ()
    took_ms: float = 0.0


class ReloadMetrics:
    """``aggregator_config_reloads_total{result}`` and ``aggregator_config_info{sha256}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Imported here: the command imports this module before the workers' parent has set
        # up prometheus-client's multi-process mode (aggregator/workers.py).
        from prometheus_client import Counter, Gauge

        reloads = Counter(
            "aggregator_config_reloads", "Config reloads (SIGHUP or a changed file), by result.",
            ["result"], registry=registry,
        )  # fmt: skip
        self.reloads = {result: reloads.labels(result) for result in RESULTS}
        self.info = Gauge(
            "aggregator_config_info", "1 for the SHA-256 of the config file in force.",
            ["sha256"], registry=registry, multiprocess_mode="livemax",
        )  # fmt: skip

    def in_force(self, old: str, new: str) -> None:
        if old != new:
            self.info.labels(old).set(0)
        self.info.labels(new).set(1)


class Reloader:
    """Loads the config file again on ``request()`` (SIGHUP) or when its content changes, and
    swaps the State of ``holder`` for the new one; owns the retired States until their last
    call has ended and their endpoints are closed."""

    def __init__(
        self,
        source: ConfigFile,
        holder: Holder,
        open_endpoint: OpenEndpoint,
        registry: CollectorRegistry,
        applied: Callable[[Config], None] = lambda config: None,
    ) -> None:
        self.path = source.path
        self.sha256 = source.sha256  # of the config in force
        self._tried = source.sha256  # of the last file read, good or bad
        self._holder = holder
        self._open_endpoint = open_endpoint
        self._applied = applied  # lets the server extend its metrics and admin record
        self.metrics = ReloadMetrics(registry)
        self.metrics.in_force(self.sha256, self.sha256)
        self.loaded_at = time.time()
        self.last: Outcome | None = None
        self._retired: list[State] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._wanted = asyncio.Event()
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return (
            f"<Reloader {self.path} sha256={self.sha256[:12]} "
            f"[{len(self._retired)} retired states, {len(self._closing)} closing]>"
        )

    def request(self) -> None:
        """Asks for a reload (SIGHUP): ``watch`` runs it."""
        self._wanted.set()

    async def watch(self) -> None:
        """Reloads when asked, and when the file's content changed (every
        ``server.config_check_interval``; only when asked if it is 0). Runs until cancelled."""
        while True:
            interval = self._holder.state.config.server.config_check_interval
            try:
                async with asyncio.timeout(interval or None):
                    await self._wanted.wait()
            except TimeoutError:
                await self._check()
                continue
            self._wanted.clear()
            await self.reload()

    async def _check(self) -> None:
        try:
            _, digest = await asyncio.to_thread(read, self.path)
        except ConfigError:
            digest = ""  # unreadable for now (mid-swap, or gone): reloading says why
        if digest != self._tried:
            await self.reload()

    async def reload(self) -> Outcome:
        """Loads the file and applies it, or logs and counts why not; returns what happened."""
        async with self._lock:
            started = time.perf_counter()
            digest, loaded = await asyncio.to_thread(_load, self.path)
            self._tried = digest
            if isinstance(loaded, ConfigError):
                return self._refused(loaded, digest, started)
            outcome = self._apply(loaded, digest)
            outcome.took_ms = (time.perf_counter() - started) * 1000
            log.info(
                "config reloaded from %s (sha256 %s) in %.1f ms", self.path, digest[:12],
                outcome.took_ms,
                extra={"event": "config_reload", "result": "ok", "sha256": digest},
            )  # fmt: skip
            self.last = outcome
            return outcome

    def _refused(self, exc: ConfigError, digest: str, started: float) -> Outcome:
        self.metrics.reloads["error"].inc()
        for problem in exc.problems:
            log.error("config reload: %s", problem, extra={"event": "config_reload"})
        log.error(
            "config reload refused (%d problems): the config in force (sha256 %s) stays",
            len(exc.problems), self.sha256[:12],
            extra={"event": "config_reload", "result": "error", "problems": len(exc.problems)},
        )  # fmt: skip
        took = (time.perf_counter() - started) * 1000
        self.last = Outcome(time.time(), "error", digest, len(exc.problems), took_ms=took)
        return self.last

    def _apply(self, loaded: Loaded, digest: str) -> Outcome:
        """Swaps the State: synchronous, so no call starts between the old and the new."""
        old = self._holder.state
        config = loaded.config
        restart = tuple(needs_restart(old.config, config))
        for key in restart:
            log.warning(
                "config reload: %s changed: needs a restart (the rest is applied)", key,
                extra={"event": "config_reload", "key": key},
            )  # fmt: skip
        for warning in config.warnings:
            log.warning("config: %s", warning)
        endpoints, descriptors = self._endpoints(old, config.upstreams)
        new = State(config, loaded.catalog, Gate(config.auth), endpoints, descriptors)
        self._applied(config)
        self._holder.state = new
        self._retire(old)
        self.metrics.reloads["ok"].inc()
        self.metrics.in_force(self.sha256, digest)
        self.sha256, self.loaded_at = digest, time.time()
        return Outcome(self.loaded_at, "ok", digest, needs_restart=restart)

    def _endpoints(
        self, old: State, upstreams: Mapping[str, UpstreamConfig]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Each upstream's endpoint: the one in force when its settings are the same, else new."""
        endpoints: dict[str, Any] = {}
        descriptors: dict[str, Any] = {}
        for name, config in upstreams.items():
            if old.config.upstreams.get(name) == config and name in old.endpoints:
                endpoints[name] = old.endpoints[name]
                found = old.descriptors.get(name)
            else:
                endpoints[name], found = self._open_endpoint(config)
            if found is not None:
                descriptors[name] = found
        return endpoints, descriptors

    def _retire(self, old: State) -> None:
        old.on_idle = self._idle
        self._retired.append(old)
        if not old.calls:
            self._idle(old)

    def _idle(self, state: State) -> None:
        """A retired State's last call ended: close what no State in use holds any more."""
        if state in self._retired:
            self._retired.remove(state)
        held = {id(endpoint) for live in self._live() for endpoint in live.endpoints.values()}
        unused = [e for e in state.endpoints.values() if id(e) not in held]
        if unused:
            task = asyncio.get_running_loop().create_task(_close(unused))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _live(self) -> Iterator[State]:
        yield self._holder.state
        yield from self._retired

    async def aclose(self) -> None:
        """At shutdown: closes every retired State's endpoints, and waits for those closing."""
        retired, self._retired = self._retired, []
        held = {id(endpoint) for endpoint in self._holder.state.endpoints.values()}
        unused = {
            id(e): e for state in retired for e in state.endpoints.values() if id(e) not in held
        }
        await _close(list(unused.values()))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def admin_info(self) -> dict[str, Any]:
        """What the admin page shows of the config: its hash, and the last reload."""
        last = self.last
        return {
            "sha256": self.sha256,
            "loaded_at": self.loaded_at,
            "last_reload": None
            if last is None
            else {
                "at": last.at, "result": last.result, "sha256": last.sha256,
                "problems": last.problems, "needs_restart": list(last.needs_restart),
                "took_ms": round(last.took_ms, 3),
            },
        }  # fmt: skip


def _load(path: str) -> tuple[str, Loaded | ConfigError]:
    """The file's hash ("" when unreadable), and the file read and checked as ``aggregator
    serve`` does at start, or why it cannot be used (blocking: run off the loop)."""
    try:
        text, digest = read(path)
    except ConfigError as exc:
        return "", exc
    try:
        return digest, load_text(text, source=path)
    except ConfigError as exc:
        return digest, exc


async def _close(endpoints: list[Any]) -> None:
    results = await asyncio.gather(*(e.aclose() for e in endpoints), return_exceptions=True)
    for endpoint, result in zip(endpoints, results, strict=True):
        if isinstance(result, Exception):
            log.warning("closing %r after a reload failed: %s", endpoint, result)
    if endpoints:
        log.info("closed %d upstreams retired by a reload", len(endpoints))


def needs_restart(old: Config, new: Config) -> Iterator[str]:
    """The keys of RESTART_KEYS whose value differs."""
    for key in RESTART_KEYS:
        if _at(old, key) != _at(new, key):
            yield key
    if _quotas(old) != _quotas(new):
        yield QUOTAS


def _quotas(config: Config) -> dict[str, tuple[Any, ...]]:
    callers = config.auth.callers if config.auth is not None else {}
    return {name: (c.rate_limit, c.max_concurrent_calls) for name, c in callers.items()}


def _at(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value
