"""An upstream that is a fleet (docs/fleet.md): its endpoints, how a call picks one, and when one
is taken out.

Every entry of an upstream's ``url`` (http) or ``address`` (grpc) is looked up, and every
address it resolves to is an endpoint with a connection pool (or gRPC channel) of its own: a
Kubernetes headless Service gives one per pod. Names are looked up again every
``resolve_interval`` by a task the fleet owns, never on a call's path; an endpoint that left
DNS drains (its calls in flight finish, then its connections close); a failed lookup keeps the
last good set and is logged once.

Balancing is Envoy's LEAST_REQUEST with its default choice_count of 2 (Finagle's P2C, after
Mitzenmacher's "power of two choices"): two endpoints picked at random, the call goes to the
one with fewer calls in flight. ``round_robin`` takes them in turn.

Outlier detection follows Envoy's consecutive-5xx detector
(source/common/upstream/outlier_detection_impl.cc): ``consecutive_failures`` failures in a row
eject an endpoint for ``base_ejection_time`` times the number of times it was ejected (capped
at MAX_EJECTION_TIME, as Envoy's max_ejection_time default of 300 s caps it; ours is 10 min),
never more than ``max_ejection_percent`` of the endpoints at once, but always one of two or
more (Envoy's rule too). Unlike Envoy, readmission runs on a timer per ejected endpoint rather
than on a sweep every ``interval``. When every endpoint is ejected (possible at 100%), calls go
to all of them, as Envoy's panic mode does.

What is a failure here is decided by one rule, aggregator/policies/blame.py, which the policies
(aggregator/policies/endpoint.py) apply to each attempt before telling ``done``: connect
failures, resets, the upstream's own timeouts, 5xx and gRPC UNAVAILABLE, INTERNAL...; a
caller's bad input, its own deadline, a cancellation, our own lateness say nothing of an
endpoint (docs/resilience.md). Ejection runs on a ``Clock`` (aggregator/timers.py).

gRPC: one channel per endpoint (not grpc's own ``round_robin`` policy over a ``dns:///`` name),
so that both kinds of upstream share this one balancer, its ejection, its metrics, and a retry
that moves to another endpoint; grpc's policy would hide which endpoint answered.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from aggregator.config import UpstreamConfig
from aggregator.errors import TargetFailure
from aggregator.timers import SYSTEM_CLOCK, Clock
from aggregator.upstreams.descriptors import Descriptors
from aggregator.upstreams.seam import Balancer, Member, Upstream
from aggregator.v1 import aggregator_pb2 as pb

log = logging.getLogger("aggregator.fleet")

MAX_EJECTION_TIME = 600.0  # seconds: base_ejection_time x times ejected never exceeds this
# Endpoints an upstream keeps, whatever its names resolve to: each costs a pool or a channel.
MAX_ENDPOINTS = 256
_RETRY_FIRST_LOOKUP = 1.0  # seconds between lookups while a name has never resolved

# A name and port to the IP addresses it resolves to (tests inject their own).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
# An entry and one of its addresses to the upstream that calls that endpoint alone.
Opener = Callable[[str, str], Upstream]


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6), each once, in the resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of ``url`` / ``address``: the text configured, its host and port."""

    text: str
    host: str
    port: int

    @property
    def literal(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def entries(config: UpstreamConfig) -> list[Entry]:
    found = []
    for text in config.endpoints or ((config.url or config.address),):
        if config.kind == "http":
            parts = urlsplit(text)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            found.append(Entry(text, parts.hostname or "", port))
        else:
            host, _, port_text = text.rpartition(":")
            found.append(Entry(text, host.strip("[]"), int(port_text)))
    return found


class Single:
    """The balancer of an upstream at one literal address: its one endpoint takes every
    attempt, and is never ejected (the breaker alone guards it)."""

    def __init__(
        self, upstream: Upstream, descriptors: Callable[[Balancer], Descriptors] | None = None
    ) -> None:
        self.name = upstream.name
        self._member = Member(("", ""), "", upstream)
        self.descriptors = descriptors(self) if descriptors is not None else None

    def __repr__(self) -> str:
        return f"<Single {self._member.upstream!r}>"

    async def choose(self, tried: Sequence[Member], deadline: float) -> Member:
        return self.ready(tried)

    def ready(self, tried: Sequence[Member]) -> Member:
        self._member.outstanding += 1
        return self._member

    def done(self, member: Member, failed: bool | None) -> None:
        member.outstanding -= 1

    def all_failing(self) -> bool:
        return True  # asked of a failed attempt: its one endpoint is the upstream

    def untried(self, tried: Sequence[Member]) -> bool:
        return not tried

    def counts(self) -> tuple[int, int]:
        return 1, 0

    async def aclose(self) -> None:
        if self.descriptors is not None:
            await self.descriptors.aclose()
        await self._member.upstream.aclose()


class FleetMetrics:
    """What the fleet reports (docs/fleet.md): set by the fleet, labelled by upstream only."""

    def __init__(
        self,
        active: Callable[[float], None],
        ejected: Callable[[float], None],
        ejection: Callable[[], None],
    ) -> None:
        self.active = active
        self.ejected = ejected
        self.ejection = ejection


def _no_metrics() -> FleetMetrics:
    return FleetMetrics(lambda value: None, lambda value: None, lambda: None)


class Fleet:
    """The endpoints of one upstream. ``choose`` picks one for an attempt, ``done`` hears how
    it went; the policies call both around each attempt (aggregator/policies/endpoint.py)."""

    def __init__(
        self,
        config: UpstreamConfig,
        open_member: Opener,
        resolver: Resolver = system_resolver,
        metrics: FleetMetrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        descriptors: Callable[[Balancer], Descriptors] | None = None,
    ) -> None:
        """``descriptors``: makes a gRPC fleet's message types, for JSON targets, from the
        fleet (whose endpoints its reflection may ask)."""
        self.name = config.name
        self._clock = clock
        self._config = config
        self._outlier = config.outlier_detection
        self._open = open_member
        self._resolver = resolver
        self.metrics = metrics or _no_metrics()
        self._round_robin = config.balancer == "round_robin"
        self._entries = entries(config)
        self._members: dict[tuple[str, str], Member] = {}
        self._active: list[Member] = []  # taking calls
        self._next = 0  # round_robin's turn
        self._closing: set[asyncio.Task[None]] = set()
        self._failing: set[str] = set()  # names whose last lookup failed (logged once)
        self._ready = asyncio.Event()
        self.descriptors = descriptors(self) if descriptors is not None else None
        names = [entry for entry in self._entries if not entry.literal]
        self._update({(entry, entry.host) for entry in self._entries if entry.literal}, names)
        self._resolving: asyncio.Task[None] | None = None
        if names:
            self._resolving = asyncio.create_task(
                self._resolve_forever(), name=f"resolve {self.name}"
            )
        if self._members:  # IP addresses among the entries: calls need not wait for names
            self._ready.set()

    def __repr__(self) -> str:
        ejected = sum(1 for member in self._members.values() if member.ejected_until)
        return (
            f"<Fleet {self.name} [{len(self._members)} endpoints, {ejected} ejected, "
            f"{self._config.balancer}]>"
        )

    @property
    def members(self) -> list[Member]:
        return list(self._members.values())

    def counts(self) -> tuple[int, int]:
        ejected = sum(1 for member in self._members.values() if member.ejected_until)
        return len(self._members) - ejected, ejected

    # Resolution -----------------------------------------------------------------------------

    async def _resolve_forever(self) -> None:
        while True:
            try:
                await self.resolve()
            except Exception:  # one bad update must not end resolution for good
                log.exception("upstream %s: resolving its endpoints failed", self.name)
            wait = self._config.resolve_interval
            if not self._members:
                wait = min(wait, _RETRY_FIRST_LOOKUP)
            await asyncio.sleep(wait)

    async def resolve(self) -> None:
        """Looks every name up once; keeps a name's last addresses when its lookup fails."""
        wanted: set[tuple[Entry, str]] = set()
        kept: list[Entry] = []
        for entry in self._entries:
            if entry.literal:
                wanted.add((entry, entry.host))
                continue
            addresses = await self._lookup(entry)
            if addresses is None:
                kept.append(entry)
            else:
                wanted.update((entry, address) for address in addresses)
        self._update(wanted, kept)
        if self._members:
            self._ready.set()

    async def _lookup(self, entry: Entry) -> Sequence[str] | None:
        try:
            addresses = await self._resolver(entry.host, entry.port)
            if not addresses:
                raise OSError(f"{entry.host} has no addresses")
        except (OSError, UnicodeError) as exc:  # gaierror; a name IDNA cannot encode
            if entry.host not in self._failing:
                self._failing.add(entry.host)
                log.warning(
                    "upstream %s: looking up %s failed (%s); its last addresses stay in use",
                    self.name, entry.host, exc,
                )  # fmt: skip
            return None
        if entry.host in self._failing:
            self._failing.discard(entry.host)
            log.info("upstream %s: %s resolves again", self.name, entry.host)
        return addresses

    def _update(self, wanted: set[tuple[Entry, str]], kept: list[Entry]) -> None:
        """Opens the endpoints that are new, drains those that left (except a kept name's)."""
        keys = {
            (entry.text, address): (entry, address)
            for entry, address in sorted(wanted, key=lambda pair: (pair[0].text, pair[1]))
        }
        if len(keys) > MAX_ENDPOINTS:
            log.warning(
                "upstream %s: its names resolve to %d addresses; the first %d are used",
                self.name, len(keys), MAX_ENDPOINTS,
            )  # fmt: skip
            keys = dict(list(keys.items())[:MAX_ENDPOINTS])
        kept_texts = {entry.text for entry in kept}
        for key, member in list(self._members.items()):
            if key not in keys and key[0] not in kept_texts:
                self._remove(member)
        for key, (entry, address) in keys.items():
            if key not in self._members:
                member = Member(key, _address(address, entry.port), self._open(entry.text, address))
                self._members[key] = member
                if self._ready.is_set() or len(self._members) > 1:
                    log.info("upstream %s: endpoint %s added", self.name, member.address)
        self._rebuild()

    def _remove(self, member: Member) -> None:
        log.info("upstream %s: endpoint %s removed, draining", self.name, member.address)
        del self._members[member.key]
        member.removed = True
        if member.readmission is not None:
            member.readmission.cancel()
        if member.outstanding == 0:
            self._close_member(member)

    def _close_member(self, member: Member) -> None:
        task = asyncio.create_task(member.upstream.aclose(), name=f"close {member.address}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _rebuild(self) -> None:
        self._active = [member for member in self._members.values() if not member.ejected_until]
        ejected = len(self._members) - len(self._active)
        self.metrics.active(len(self._active))
        self.metrics.ejected(ejected)

    # Balancing ------------------------------------------------------------------------------

    async def choose(self, tried: Sequence[Member], deadline: float) -> Member:
        """An endpoint for the next attempt, another than those in ``tried`` when there is one;
        waits for the first lookup until the loop time ``deadline``."""
        if not self._ready.is_set():
            await self._first_lookup(deadline)
        member = self.ready(tried)
        assert member is not None
        return member

    def ready(self, tried: Sequence[Member]) -> Member | None:
        if not self._ready.is_set():
            return None
        member = self.pick(tried)
        member.outstanding += 1
        return member

    async def _first_lookup(self, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await self._ready.wait()
        except TimeoutError:
            names = ", ".join(sorted({entry.host for entry in self._entries}))
            raise TargetFailure(
                pb.OUTCOME_UNAVAILABLE, f"{self.name} has no endpoints yet: {names} did not resolve"
            ) from None

    def pick(self, tried: Sequence[Member] = ()) -> Member:
        candidates = self._active or list(self._members.values())  # all out: panic, use all
        if tried and len(candidates) > 1:
            fresh = [member for member in candidates if member not in tried]
            candidates = fresh or candidates
        count = len(candidates)
        if count == 1:
            return candidates[0]
        if self._round_robin:
            self._next = (self._next + 1) % count
            return candidates[self._next]
        first = random.randrange(count)
        second = random.randrange(count - 1)
        second += second >= first
        a, b = candidates[first], candidates[second]
        return a if a.outstanding <= b.outstanding else b

    # Outlier detection ----------------------------------------------------------------------

    def untried(self, tried: Sequence[Member]) -> bool:
        """Whether an endpoint taking calls is not in ``tried``."""
        return any(member not in tried for member in self._active)

    def all_failing(self) -> bool:
        """Every endpoint taking calls failed its last attempt: the upstream, not an endpoint,
        is failing (what its breaker counts)."""
        return all(member.failures for member in self._active)

    def done(self, member: Member, failed: bool | None) -> None:
        """Records an attempt on ``member`` (``failed`` None: it says nothing of its health)."""
        member.outstanding -= 1
        if member.removed:
            if member.outstanding == 0:
                self._close_member(member)
            return
        if failed is None:
            return
        if not failed:
            member.failures = 0
            return
        member.failures += 1
        if member.failures >= self._outlier.consecutive_failures and not member.ejected_until:
            self._eject(member)

    def _eject(self, member: Member) -> None:
        count = len(self._members)
        ejected = count - len(self._active)
        allowed = max(1 if count >= 2 else 0, count * self._outlier.max_ejection_percent // 100)
        if ejected >= allowed:
            return
        now = self._clock.monotonic()
        base = self._outlier.base_ejection_time
        if member.ejections:  # one fewer for each base_ejection_time it stayed healthy, as Envoy
            healthy = int((now - member.readmitted_at) / base)
            member.ejections = max(0, member.ejections - healthy)
        member.ejections += 1
        seconds = min(base * member.ejections, MAX_EJECTION_TIME)
        member.ejected_until = now + seconds
        member.failures = 0
        member.readmission = self._clock.call_later(seconds, lambda: self._readmit(member))
        self.metrics.ejection()
        self._rebuild()
        log.warning(
            "upstream %s: endpoint %s ejected for %gs after %d failures in a row (ejection %d)",
            self.name, member.address, seconds, self._outlier.consecutive_failures,
            member.ejections,
        )  # fmt: skip

    def _readmit(self, member: Member) -> None:
        member.readmission = None
        member.ejected_until = 0.0
        member.readmitted_at = self._clock.monotonic()
        if member.removed:
            return
        self._rebuild()
        log.info("upstream %s: endpoint %s takes calls again", self.name, member.address)

    async def aclose(self) -> None:
        if self.descriptors is not None:
            await self.descriptors.aclose()
        if self._resolving is not None:
            self._resolving.cancel()
            await asyncio.wait([self._resolving])
        for member in self._members.values():
            if member.readmission is not None:
                member.readmission.cancel()
        members = list(self._members.values())
        self._members.clear()
        self._active = []
        await asyncio.gather(*(member.upstream.aclose() for member in members))
        if self._closing:
            await asyncio.wait(self._closing)


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
