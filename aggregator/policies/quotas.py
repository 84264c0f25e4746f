"""Callers' quotas: ``auth.callers.<name>.rate_limit`` and ``max_concurrent_calls``.

Checked once a call's caller is known and before anything is planned or sent; a caller over
either gets RESOURCE_EXHAUSTED with ``google.rpc.QuotaFailure`` and ``google.rpc.RetryInfo`` in
``grpc-status-details-bin``. Each caller has its own counters, so one over its quota never
slows another. The rate is held per process (``limits.backend: memory``) or for every replica
together in Redis (``redis``, policies/global_limits.py); ``max_concurrent_calls`` is always per
process.
"""

from __future__ import annotations

import grpc

from aggregator.config import AuthConfig, CallerConfig
from aggregator.errors import CallFailure, quota_failure, retry_info
from aggregator.metrics import Metrics
from aggregator.policies.global_limits import SharedLimits
from aggregator.policies.limits import TokenBucket
from aggregator.security.auth import Caller

# How soon a caller at its max_concurrent_calls may try again: calls end in about a call's
# latency, and a tenth of a second lets most of them.
CONCURRENCY_RETRY = 0.1


class QuotaExceeded(CallFailure):
    """A caller over its quota; its status details (the one path every CallFailure takes:
    errors.py) say which quota and when to try again."""

    def __init__(self, caller: str, reason: str, message: str, retry_after: float) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            message,
            reason="CALLER_QUOTA",
            metadata={"caller": caller, "quota": reason},
            details=(quota_failure(f"caller:{caller}", message), retry_info(retry_after)),
        )
        self.caller = caller
        self.quota = reason  # rate_limit | concurrency
        self.retry_after = retry_after


class CallerQuota:
    """One caller's counters in this process."""

    def __init__(self, config: CallerConfig, shared: SharedLimits | None) -> None:
        self.name = config.name
        limit = config.rate_limit
        self.bucket = TokenBucket(config.name, limit.rate, limit.burst) if limit else None
        self._shared = shared if limit else None
        self._key = shared.key("caller", config.name) if shared is not None else ""
        self.max_concurrent = config.max_concurrent_calls
        self.inflight = 0

    def __repr__(self) -> str:
        limit = self.max_concurrent if self.max_concurrent is not None else "-"
        return f"<CallerQuota {self.name} [{self.inflight}/{limit} in flight] {self.bucket!r}>"

    async def rate_wait(self) -> float:
        """0.0 when a call may start now (and it is counted), else seconds until one may."""
        bucket = self.bucket
        if bucket is None:
            return 0.0
        if self._shared is not None:
            decision = await self._shared.admit(self._key, bucket.rate, bucket.burst, 0.0)
            if decision is not None:
                return 0.0 if decision.admitted else max(decision.wait, 1e-3)
        return bucket.try_take()


class Quotas:
    """Every caller's quota; ``admit`` before a call is planned, ``release`` when it ends."""

    def __init__(
        self, auth: AuthConfig | None, shared: SharedLimits | None, metrics: Metrics
    ) -> None:
        callers = auth.callers if auth else {}
        self._quotas = {
            name: CallerQuota(caller, shared)
            for name, caller in callers.items()
            if caller.rate_limit is not None or caller.max_concurrent_calls is not None
        }
        self._metrics = metrics

    def __repr__(self) -> str:
        return f"<Quotas {list(self._quotas.values())!r}>"

    async def admit(self, caller: Caller | None) -> CallerQuota | None:
        """The caller's quota, one call more in flight; QuotaExceeded when it is over it."""
        quota = self._quotas.get(caller.name) if caller is not None else None
        if quota is None:
            return None
        limit = quota.max_concurrent
        if limit is not None and quota.inflight >= limit:
            raise self._refuse(
                quota, "concurrency",
                f"caller {quota.name!r} has {limit} calls in flight "
                "(auth.callers.<name>.max_concurrent_calls)",
                CONCURRENCY_RETRY,
            )  # fmt: skip
        quota.inflight += 1  # held across the await: a concurrent admission counts it
        try:
            wait = await quota.rate_wait()
        except BaseException:
            quota.inflight -= 1
            raise
        if wait > 0:
            quota.inflight -= 1
            assert quota.bucket is not None
            raise self._refuse(
                quota, "rate_limit",
                f"caller {quota.name!r} is over its rate limit ({quota.bucket.rate:g}/s, burst "
                f"{quota.bucket.burst}) (auth.callers.<name>.rate_limit)",
                wait,
            )  # fmt: skip
        return quota

    def _refuse(self, quota: CallerQuota, reason: str, message: str, wait: float) -> QuotaExceeded:
        self._metrics.caller_rejections_by[quota.name, reason].inc()
        return QuotaExceeded(quota.name, reason, message, wait)

    @staticmethod
    def release(quota: CallerQuota | None) -> None:
        if quota is not None:
            quota.inflight -= 1
