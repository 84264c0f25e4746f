"""What the benchmark runs: scenarios, the requests they send, and each side's upstream map.

Every side gets the same ``AggregateRequest`` (target ``t0``, ``t1``, ... naming upstreams
``u0``-``u4`` and ``bulk`` over REST, ``g0``/``g1`` over gRPC). The REST upstreams all live on one
aiohttp app (``/delay/{ms}``), the gRPC ones on one grpc.aio server (``Delay``, milliseconds as
ASCII). Each REST upstream name has a port of its own on that app, as distinct services would.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf import json_format

from aggregator.v1 import aggregator_pb2 as pb
from bench import quote

SIDES = ("aggregator", "naive", "sequential")
# The gRPC stack alone: a grpc.aio server that calls nothing, waits as long as the slowest target
# would take and streams ready-made results. Its overhead is what no Python aggregator on
# grpc.aio can go below on this machine (bench/naive.py --floor); at FLOOR_CONCURRENCY its CPU
# per aggregate is the physical limit the others' "CPU above the floor" is counted from.
FLOOR = "floor"
FLOOR_CONCURRENCY = (1, 64)
DELAY_METHOD = "/bench.v1.Upstream/Delay"
REST_UPSTREAMS = ("u0", "u1", "u2", "u3", "u4")
GRPC_UPSTREAMS = ("g0", "g1")
TYPED_UPSTREAM = "quotes"  # bench/quote.py's typed method, on the gRPC upstreams' server
BULK_UPSTREAM = "bulk"  # batch1000's own pool, warmed by its warm-up request
# The `fleet` scenarios' upstream: three endpoints (ports of their own), the last one sick:
# it answers every request after SICK_MS, past the fleet's FLEET_TIMEOUT_MS (a bad pod).
FLEET_UPSTREAM = "fleet"
FLEET_ENDPOINTS = ("f0", "f1", "f2")
# `fleet-healthy`: one upstream of three endpoints that all answer in time (f3 is healthy too).
HEALTHY_FLEET = "fleet3"
HEALTHY_ENDPOINTS = ("f0", "f1", "f3")
SICK_ENDPOINT = "f2"
SICK_MS = 300.0
FLEET_TIMEOUT_MS = 150.0
ROUND_ROBIN_SUFFIX = "-rr"
HTTP_UPSTREAMS = (*REST_UPSTREAMS, BULK_UPSTREAM, *FLEET_ENDPOINTS, "f3")
# Both sides may hold this many connections to one upstream: the aggregator through each
# upstream's max_concurrency, the naive peers through limit_per_host of their one session.
CONNECTIONS_PER_UPSTREAM = 100

# The aggregator's config gains "-hedged" twins of the REST upstreams with `hedge: {delay: ...}`,
# and the `tail-hedged` scenario sends the aggregator the same calls as `tail` through them (the
# naive and sequential sides are unchanged: they have no hedging). None turns it off.
HEDGE_DELAY_MS: float | None = 30.0
HEDGED_SUFFIX = "-hedged"
# And "-cached" twins with a response cache, for `cache-hot`.
CACHED_SUFFIX = "-cached"


@dataclass(frozen=True, slots=True)
class Call:
    """One target: an upstream name, its delay, and optionally how often it is slow."""

    upstream: str
    ms: float
    kind: Literal["http", "grpc", "typed"] = "http"  # typed: bench/quote.py's method
    slow_pct: float = 0.0  # the upstream rolls its seeded RNG per request
    slow_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Point:
    """One load level: ``concurrency`` workers, each slice bounded by time and by count."""

    concurrency: int
    seconds: float = 2.0
    max_calls: int = 1_000_000

    @property
    def key(self) -> str:
        return f"c{self.concurrency}"

    @property
    def sides(self) -> tuple[str, ...]:
        return (*SIDES, FLOOR) if self.concurrency in FLOOR_CONCURRENCY else SIDES


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    calls: tuple[Call, ...]
    points: tuple[Point, ...]
    rounds: int = 3
    timeout: float = 5.0  # the caller's deadline for one aggregate, in seconds
    warmup: tuple[Call, ...] | None = None  # a lighter request to warm pools, if not `calls`
    warmup_max_calls: int | None = None
    aggregator_suffix: str = ""  # the aggregator's upstream names get this (hedged twins)
    # Typed calls go to every side in JSON (decode_json on): the naive peers convert them with
    # json_format, as a user with the generated classes would (bench/naive.py).
    typed_json: bool = False
    # The aggregator is sent the named aggregate of this name (its targets: ``calls``, in the
    # config, see named_aggregate) with NAMED_PARAMS; the other sides get the same targets.
    named: str = ""

    def request_for(self, side: str, warmup: bool = False) -> pb.AggregateRequest:
        if self.named and side == "aggregator":
            request = pb.AggregateRequest(aggregate=self.named)
            request.params.update(NAMED_PARAMS)
            return request
        calls = self.warmup if warmup and self.warmup is not None else self.calls
        suffix = self.aggregator_suffix if side == "aggregator" else ""
        return pb.AggregateRequest(
            targets=[_target(i, c, suffix, self.typed_json) for i, c in enumerate(calls)]
        )

    @property
    def slowest_ms(self) -> float:
        return max(max(call.ms, call.slow_ms) for call in self.calls)


def _target(index: int, call: Call, suffix: str, in_json: bool = False) -> pb.Target:
    upstream = call.upstream + (suffix if call.kind == "http" else "")
    if call.kind == "typed":
        typed = pb.GrpcCall(upstream=upstream, method=quote.METHOD)
        if in_json:
            typed.json.struct_value.update(quote.request_json(call.ms))
        else:
            typed.request = quote.request_bytes(call.ms)
        return pb.Target(id=f"t{index}", grpc=typed, decode_json=in_json)
    if call.kind == "grpc":
        grpc_call = pb.GrpcCall(upstream=upstream, method=DELAY_METHOD, request=_ms(call).encode())
        return pb.Target(id=f"t{index}", grpc=grpc_call)
    query = {}
    if call.slow_pct:
        query = {"slow_pct": f"{call.slow_pct:g}", "slow_ms": f"{call.slow_ms:g}"}
    http_call = pb.HttpCall(upstream=upstream, path=f"/delay/{_ms(call)}", query=query)
    return pb.Target(id=f"t{index}", http=http_call)


def _ms(call: Call) -> str:
    return f"{call.ms:g}"


def _rest(*delays: float) -> tuple[Call, ...]:
    return tuple(Call(REST_UPSTREAMS[i % 5], ms) for i, ms in enumerate(delays))


_TAIL = (*_rest(20, 20, 20, 20), Call("u4", 20, slow_pct=5, slow_ms=200))

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "page5",
            "the demo's product page: five REST targets at 120/95/110/140/65 ms",
            _rest(120, 95, 110, 140, 65),
            (Point(1, seconds=3.0), Point(64)),
        ),
        Scenario(
            "flat5x20ms",
            "five REST targets at 20 ms: where does each side saturate?",
            _rest(20, 20, 20, 20, 20),
            (Point(1), Point(16), Point(64), Point(256)),
            rounds=5,  # the headline comparison: more rounds against this machine's noise
        ),
        Scenario(
            "mixed",
            "REST at 30/50/70 ms and gRPC at 40/60 ms together",
            (
                *_rest(30, 50, 70),
                Call("g0", 40, kind="grpc"),
                Call("g1", 60, kind="grpc"),
            ),
            (Point(1), Point(64)),
        ),
        Scenario(
            "batch1000",
            "one aggregate of 1,000 REST targets at 10 ms (one pool of 100 connections)",
            tuple(Call(BULK_UPSTREAM, 10) for _ in range(1000)),
            (Point(1, seconds=1.0, max_calls=3),),
            rounds=2,
            timeout=30.0,
            warmup=tuple(Call(BULK_UPSTREAM, 10) for _ in range(100)),
            warmup_max_calls=1,
        ),
        Scenario(
            "tail",
            "five REST targets at 20 ms, one of them 200 ms 5% of the time (no hedging)",
            _TAIL,
            (Point(16),),
        ),
    )
}
if HEDGE_DELAY_MS is not None:
    SCENARIOS["tail-hedged"] = Scenario(
        "tail-hedged",
        f"tail, with the aggregator hedging after {HEDGE_DELAY_MS:g} ms",
        _TAIL,
        (Point(16),),
        aggregator_suffix=HEDGED_SUFFIX,
    )

SCENARIOS["cache-hot"] = Scenario(
    "cache-hot",
    "five REST targets at 20 ms, the same keys every time: the aggregator answers from its "
    "cache (the naive and sequential sides call the upstreams every time)",
    _rest(20, 20, 20, 20, 20),
    (Point(1), Point(64)),
    aggregator_suffix=CACHED_SUFFIX,
)

# The JSON path's cost: five gRPC targets written in JSON (encoded with the descriptors the
# aggregator fetched by reflection, answers decoded with decode_json) against the same five in
# bytes. In grpc5-json every side gets the JSON: the naive and sequential sides convert it with
# json_format and the generated classes (bench/naive.py); grpc5-bytes is bytes for everyone.
_TYPED5 = tuple(Call(TYPED_UPSTREAM, 20, kind="typed") for _ in range(5))
SCENARIOS["grpc5-bytes"] = Scenario(
    "grpc5-bytes", "five gRPC targets at 20 ms, requests and answers in bytes", _TYPED5,
    (Point(16),),
)  # fmt: skip
SCENARIOS["grpc5-json"] = Scenario(
    "grpc5-json",
    "the same five gRPC targets written in JSON, answers decoded (decode_json) by the aggregator",
    _TYPED5,
    (Point(16),),
    typed_json=True,
)

# A named aggregate (docs/named-aggregates.md) against the same targets sent ad hoc: the plan
# is made when the config loads, a call only binds its parameter. Each target's path is
# /delay/{{params.delay}}MS and the call sends delay "0": binding does real work (a path
# segment filled and encoded), and the upstream reads /delay/0120 as the 120 ms page5 sends.
NAMED_PARAMS = {"delay": "0"}
SCENARIOS["named-page5"] = Scenario(
    "named-page5",
    "page5 as the named aggregate page5 of the aggregator's config, called by name with a "
    "parameter",
    SCENARIOS["page5"].calls,
    SCENARIOS["page5"].points,
    named="page5",
)


def named_aggregate(scenario: Scenario) -> dict[str, Any]:
    """The config entry of ``scenario``'s named aggregate: its targets in proto3 JSON, every
    path's delay led by {{params.delay}}, which NAMED_PARAMS fills with a leading zero."""
    targets = []
    for target in scenario.request_for("naive").targets:
        entry = json_format.MessageToDict(target, preserving_proto_field_name=True)
        if "http" in entry:
            path = entry["http"]["path"]
            assert path.startswith("/delay/")
            entry["http"]["path"] = path.replace("/delay/", "/delay/{{params.delay}}", 1)
        targets.append(entry)
    return {"params": {"delay": {"required": True}}, "targets": targets}


# docs/fleet.md: one upstream of three endpoints, one of them sick. `fleet`: least_request with
# outlier detection (the defaults: ejected after 5 failures in a row, for 30 s); `fleet-rr`:
# round_robin without it (ejection off). The naive and sequential sides do not balance: they
# call one healthy endpoint of the three (f0), an upper bound rather than a peer here.
_FLEET3 = tuple(Call(FLEET_UPSTREAM, 20) for _ in range(3))
SCENARIOS["fleet"] = Scenario(
    "fleet",
    f"three targets on a fleet of three endpoints, one answering after {SICK_MS:g} ms (past "
    f"its {FLEET_TIMEOUT_MS:g} ms timeout): least_request with outlier detection",
    _FLEET3,
    (Point(16),),
)
SCENARIOS["fleet-rr"] = Scenario(
    "fleet-rr",
    "the same fleet with round_robin and no outlier detection",
    _FLEET3,
    (Point(16),),
    aggregator_suffix=ROUND_ROBIN_SUFFIX,
)

# Issue 21's fleet comparison: five targets on a fleet of three healthy endpoints
# (least_request, outlier detection on), against the naive side calling one of them (f0).
SCENARIOS["fleet-healthy"] = Scenario(
    "fleet-healthy",
    "five REST targets at 20 ms on a fleet of three healthy endpoints (least_request, outlier "
    "detection on); the naive side calls one of the three",
    tuple(Call(HEALTHY_FLEET, 20) for _ in range(5)),
    (Point(16), Point(64)),
)

# An upstream rate limit held in Redis (limits.backend: redis, scope: global) against the same
# limit held in the process: five REST targets through "-local" and "-global" twins whose limit
# never refuses, so the difference between the two is what one admission costs (five a call).
# The harness starts a redis-server for it (on the harness's CPUs, as a Redis elsewhere).
LOCAL_LIMIT_SUFFIX, GLOBAL_LIMIT_SUFFIX = "-local", "-global"
_NEVER_REFUSES = {"rate": 1e9, "burst": 1_000_000}
SCENARIOS["limits-memory"] = Scenario(
    "limits-memory",
    "five REST targets at 20 ms, each upstream with a rate_limit held in the process",
    _rest(20, 20, 20, 20, 20),
    (Point(1), Point(16)),
    aggregator_suffix=LOCAL_LIMIT_SUFFIX,
)
SCENARIOS["limits-redis"] = Scenario(
    "limits-redis",
    "the same with the rate_limits held in Redis for every replica (limits.backend: redis, "
    "scope: global): one Redis round trip an admission",
    _rest(20, 20, 20, 20, 20),
    (Point(1), Point(16)),
    aggregator_suffix=GLOBAL_LIMIT_SUFFIX,
)

# Scenarios that cannot run, and why.
SKIPPED: dict[str, str] = {}
if shutil.which("redis-server") is None:
    SKIPPED["limits-redis"] = "skipped: redis-server is not installed (make test installs it)"
    del SCENARIOS["limits-redis"]
if HEDGE_DELAY_MS is None:
    SKIPPED["tail-hedged"] = (
        "skipped: hedging is not implemented yet (set HEDGE_DELAY_MS in bench/scenarios.py)"
    )


def aggregator_config(
    http_urls: Mapping[str, str],
    grpc_address: str,
    port: int,
    metrics_port: int,
    redis_url: str = "",
) -> dict[str, Any]:
    """A production-like config: defaults plus breaker, bulkhead (max_concurrency), metrics."""
    policies = {
        "timeout": "1s",
        "max_concurrency": CONNECTIONS_PER_UPSTREAM,
        "circuit_breaker": {"fail_max": 5, "reset_timeout": "30s"},
    }
    http = {"kind": "http", "connect_timeout": "250ms", **policies}
    upstreams: dict[str, Any] = {name: {**http, "url": http_urls[name]} for name in REST_UPSTREAMS}
    upstreams[BULK_UPSTREAM] = {**http, "url": http_urls[BULK_UPSTREAM], "timeout": "5s"}
    for name in (*GRPC_UPSTREAMS, TYPED_UPSTREAM):
        upstreams[name] = {"kind": "grpc", "address": grpc_address, **policies}
    if HEDGE_DELAY_MS is not None:
        hedge = {"hedge": {"delay": f"{HEDGE_DELAY_MS:g}ms"}}
        for name in REST_UPSTREAMS:
            upstreams[name + HEDGED_SUFFIX] = {**upstreams[name], **hedge}
    for name in REST_UPSTREAMS:
        upstreams[name + CACHED_SUFFIX] = {**upstreams[name], "cache": {"ttl": "60s"}}
        for suffix, scope in ((LOCAL_LIMIT_SUFFIX, "local"), (GLOBAL_LIMIT_SUFFIX, "global")):
            limit = {**_NEVER_REFUSES, "scope": scope}
            upstreams[name + suffix] = {**upstreams[name], "rate_limit": limit}
    # No breaker: on this shared machine a stall past the 150 ms timeout on every endpoint at
    # once opens it for 30 s, and the figures would measure that instead of the balancing.
    fleet = {
        **{key: value for key, value in http.items() if key != "circuit_breaker"},
        "url": [http_urls[name] for name in FLEET_ENDPOINTS],
        "timeout": f"{FLEET_TIMEOUT_MS:g}ms",
    }
    upstreams[FLEET_UPSTREAM] = {**fleet, "balancer": "least_request"}
    upstreams[HEALTHY_FLEET] = {
        **http,
        "url": [http_urls[name] for name in HEALTHY_ENDPOINTS],
        "balancer": "least_request",
    }
    upstreams[FLEET_UPSTREAM + ROUND_ROBIN_SUFFIX] = {
        **fleet,
        "balancer": "round_robin",
        "outlier_detection": {"consecutive_failures": 1_000_000_000},  # off, in effect
    }
    return {
        "server": {
            "address": f"127.0.0.1:{port}",
            "metrics_address": f"127.0.0.1:{metrics_port}",
            # On, as in production (its recording is part of what is measured), on a free port.
            "admin_address": "127.0.0.1:0",
            "max_targets": 1000,
            "max_concurrent_calls": 1000,
            "default_deadline": "5s",
            "max_deadline": "30s",
            "shutdown_grace": "2s",
        },
        "upstreams": upstreams,
        "aggregates": {s.named: named_aggregate(s) for s in SCENARIOS.values() if s.named},
        # The default timeout (5 ms), as in production: a round trip past it is counted in
        # aggregator_limit_backend_errors_total and decided by the process's own limit.
        **({"limits": {"backend": "redis", "redis_url": redis_url}} if redis_url else {}),
    }


def naive_upstreams(
    http_urls: Mapping[str, str], grpc_address: str
) -> Mapping[str, Mapping[str, str]]:
    """The naive peers' view: upstream name -> where it is, nothing else."""
    upstreams: dict[str, Mapping[str, str]] = {
        name: {"kind": "http", "url": http_urls[name]} for name in HTTP_UPSTREAMS
    }
    upstreams[FLEET_UPSTREAM] = {"kind": "http", "url": http_urls[FLEET_ENDPOINTS[0]]}
    upstreams[HEALTHY_FLEET] = {"kind": "http", "url": http_urls[HEALTHY_ENDPOINTS[0]]}
    grpc_names = (*GRPC_UPSTREAMS, TYPED_UPSTREAM)
    upstreams.update({name: {"kind": "grpc", "address": grpc_address} for name in grpc_names})
    return upstreams
