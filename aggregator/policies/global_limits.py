"""Rate limits held for every replica together, in Redis (``limits.backend: redis``).

Each admission is one atomic round trip: a Lua script that runs GCRA, the generic cell rate
algorithm, against one key holding a "theoretical arrival time" (TAT), with the Redis server's
own clock (``redis.call('TIME')``), so the replicas' clocks never enter the decision. What was
read to write it:

- Brandur Leach, "Rate Limiting, Cells, and GCRA" (brandur.org/rate-limiting) and his Redis
  module redis-cell (github.com/brandur/redis-cell, ``CL.THROTTLE``): GCRA keeps one timestamp a
  key, needs no background drip, and allows ``burst`` at once then one per ``1/rate``.
- rwz/redis-gcra (``vendor/perform_gcra_ratelimit.lua``): the same algorithm as a Lua script
  reading ``TIME`` inside the script; the key expires when its TAT has passed.
- Stripe, "Scaling your API with rate limiters" (a token bucket per user in Redis, and "fail
  open" when Redis is unavailable) and Envoy's global rate-limit service (envoyproxy/ratelimit:
  Redis counters per fixed window, ``failure_mode_deny`` to choose open or closed): here the
  choice is ``limits.on_backend_error``.

The script, in integer microseconds of the server's clock (exact in Lua's doubles)::

    tat      = max(GET key or now, now)
    new_tat  = tat + interval                   # interval = 1 / rate
    wait     = new_tat - burst * interval - now # > 0: this admission is early
    admitted = wait <= max_wait                 # then SET key new_tat, expiring at new_tat

So over any window of ``t`` seconds at most ``rate * t + burst`` admissions succeed, whichever
replica asks. ``max_wait`` is 0 for a caller's quota (refused at once); an upstream's attempt may
wait for its turn while its deadline allows, as the per-process TokenBucket lets it (the wait is
reserved in Redis, and not given back when the attempt is cancelled while it waits).

When Redis does not answer within ``limits.timeout`` (or refuses), ``on_backend_error`` decides:
``local`` (the per-process limiter), ``allow`` or ``deny``. Redis is then left alone for a
second (each admission meanwhile decided the same way without waiting), so a slow Redis costs
at most one timeout a second, never one per call. Every such admission is counted in
``aggregator_limit_backend_errors_total``, and the failure is logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from aggregator.config import LimitsConfig, UpstreamConfig
from aggregator.errors import TargetFailure
from aggregator.policies.limits import TokenBucket
from aggregator.v1 import aggregator_pb2 as pb

log = logging.getLogger("aggregator")

GCRA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - tonumber(ARGV[2]) * interval - now
if wait > max_wait then
  return {0, math.ceil(wait)}
end
local ttl_ms = math.ceil((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', ttl_ms)
if wait < 0 then wait = 0 end
return {1, math.ceil(wait)}
"""

# After a failed round trip, admissions skip Redis this long (decided by on_backend_error).
RETRY_BACKEND_AFTER = 1.0
LOG_EVERY = 60.0
# Connections to Redis a process holds at most: a round trip takes well under a millisecond,
# so 32 connections carry tens of thousands of admissions a second.
POOL_SIZE = 32


@dataclass(frozen=True, slots=True)
class Decision:
    """Admitted (after ``wait`` seconds), or refused (one would be admitted in ``wait``)."""

    admitted: bool
    wait: float


class SharedLimits:
    """The Redis every global limit of this process admits through (one client, one script).

    ``admit`` answers a Decision, or None when Redis could not and ``on_backend_error`` is
    ``local``: the caller's own per-process limiter decides then."""

    def __init__(self, config: LimitsConfig, errors: Counter) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._config = config
        self._errors = errors
        self._timeout = config.timeout
        # A bounded pool that makes an admission wait for a free connection (within the
        # timeout) instead of failing at once: redis-py's default pool refuses the 101st
        # admission in flight ("Too many connections"). No retries of its own. asyncio.timeout
        # below bounds an admission; the socket timeouts bound redis-py's own clean-up of a
        # connection cut by it (it waits for the close that long).
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url, max_connections=POOL_SIZE, timeout=None,
            socket_timeout=config.timeout, socket_connect_timeout=config.timeout,
            retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        self._client: Any = aioredis.Redis.from_pool(pool)  # closed with the client
        self._script = self._client.register_script(GCRA)
        self._loop = asyncio.get_running_loop()
        self._down_until = 0.0
        self._unlogged = 0
        self._logged_at = -math.inf

    def __repr__(self) -> str:
        state = "down" if self._loop.time() < self._down_until else "up"
        return (
            f"<SharedLimits {self._config.key_prefix} [{state}, "
            f"on error: {self._config.on_backend_error}]>"
        )

    def key(self, kind: str, name: str) -> str:
        """The Redis key of one limit: configured names only, under limits.key_prefix."""
        return f"{self._config.key_prefix}:limit:{kind}:{name}"

    async def admit(self, key: str, rate: float, burst: int, max_wait: float) -> Decision | None:
        if self._loop.time() < self._down_until:
            return self._without_backend(None)
        interval = 1e6 / rate
        try:
            async with asyncio.timeout(self._timeout):
                admitted, wait_us = await self._script(
                    keys=[key], args=[repr(interval), burst, int(max(max_wait, 0.0) * 1e6)]
                )
        except Exception as exc:  # timeouts, refused connections, a Redis that is not Redis
            self._down_until = self._loop.time() + RETRY_BACKEND_AFTER
            return self._without_backend(exc)
        return Decision(bool(admitted), int(wait_us) / 1e6)

    def _without_backend(self, exc: BaseException | None) -> Decision | None:
        self._errors.inc()
        if exc is not None:
            self._log(exc)
        choice = self._config.on_backend_error
        if choice == "allow":
            return Decision(True, 0.0)
        if choice == "deny":
            return Decision(False, RETRY_BACKEND_AFTER)
        return None

    def _log(self, exc: BaseException) -> None:
        """At most one line a minute: a Redis outage must not become a log flood."""
        self._unlogged += 1
        now = self._loop.time()
        if now - self._logged_at < LOG_EVERY:
            return
        reason = "no answer within limits.timeout" if isinstance(exc, TimeoutError) else str(exc)
        log.warning(
            "limits backend failed %d times (%s); on_backend_error: %s",
            self._unlogged, reason[:200], self._config.on_backend_error,
            extra={"event": "limit_backend_error", "failures": self._unlogged},
        )  # fmt: skip
        self._unlogged, self._logged_at = 0, now

    async def aclose(self) -> None:
        await self._client.aclose()


class GlobalTokenBucket:
    """An upstream's ``rate_limit`` with ``scope: global``: TokenBucket's interface (``take``),
    decided in Redis for all replicas; ``local`` is the fallback when Redis cannot answer."""

    def __init__(self, upstream: str, local: TokenBucket, shared: SharedLimits) -> None:
        self._upstream = upstream
        self._local = local
        self._shared = shared
        self._key = shared.key("upstream", upstream)
        self._loop = asyncio.get_running_loop()

    def __repr__(self) -> str:
        return f"<GlobalTokenBucket {self._key} {self._local!r} {self._shared!r}>"

    async def take(self, deadline: float) -> None:
        """Takes a token for all replicas, waiting for it while the loop time ``deadline``
        allows, else rejects (as TokenBucket.take does)."""
        local = self._local
        max_wait = deadline - self._loop.time()
        decision = await self._shared.admit(self._key, local.rate, local.burst, max_wait)
        if decision is None:
            await local.take(deadline)
            return
        if not decision.admitted:
            raise TargetFailure(
                pb.OUTCOME_REJECTED,
                f"{self._upstream} is rate limited across replicas ({local.rate:g}/s, burst "
                f"{local.burst}) and no token would come in time",
            )
        if decision.wait > 0:
            await asyncio.sleep(decision.wait)


def rate_limiter(
    config: UpstreamConfig, shared: SharedLimits | None
) -> TokenBucket | GlobalTokenBucket | None:
    """The limiter of an upstream's ``rate_limit``: per process, or across replicas when its
    scope is global and limits.backend is redis."""
    limit = config.rate_limit
    if limit is None:
        return None
    local = TokenBucket(config.name, limit.rate, limit.burst)
    if limit.scope == "global" and shared is not None:
        return GlobalTokenBucket(config.name, local, shared)
    return local
