"""``python -m bench.budget``: the CPU budget of one aggregate, part by part (issue 21).

Each row times the real code on the ``flat5x20ms`` aggregate (five REST targets) with the
benchmark's production-like config (bench/scenarios.py): CPU time of this process
(``time.process_time``, every thread), the median of repeats after a warm-up, in microseconds
per aggregate, per target or per request as the row says. Transport and streaming rows talk
over loopback to a process of their own (bench/upstreams.py, bench/load.py), so this process's
CPU is the client's or the server's side alone. ``make bench`` runs it after the harness and
merges its figures into bench-results.json under ``cpu_budget``; docs/performance.md ("CPU
budget") says what each row covers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from aggregator import logs, server, tracing
from aggregator.admin.recent import Recent
from aggregator.call_record import CallRecord
from aggregator.config import Config, config_from_mapping
from aggregator.decoding import CallDecoder
from aggregator.fanout import Aggregation, Budget
from aggregator.lifecycle import event_loop_factory
from aggregator.metrics import Metrics
from aggregator.offload import Offload
from aggregator.plan import Plan, make_plan
from aggregator.policies import endpoint
from aggregator.policies.endpoint import GuardedUpstream
from aggregator.policies.limits import Bulkhead
from aggregator.request import GrpcRequest, HttpRequest
from aggregator.results import answered
from aggregator.security import hops
from aggregator.server import AggregatorService
from aggregator.timers import Timers
from aggregator.trailers import trailers
from aggregator.upstreams.fleet import Single
from aggregator.upstreams.grpc import GrpcUpstream
from aggregator.upstreams.http import HttpUpstream
from aggregator.upstreams.seam import Reply
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import AD_HOC
from bench.procs import Child, python_module
from bench.report import machine, now, versions
from bench.scenarios import (
    CONNECTIONS_PER_UPSTREAM,
    DELAY_METHOD,
    REST_UPSTREAMS,
    SCENARIOS,
    aggregator_config,
)
from bench.upstreams import BODY

SCENARIO = SCENARIOS["flat5x20ms"]
TARGETS = len(SCENARIO.calls)
REQUEST_ID = "0123456789abcdef0123456789abcdef"
METADATA: tuple[tuple[str, str], ...] = (("user-agent", "grpc-python-asyncio/bench"),)
ISSUER, AUDIENCE, SUBJECT = "https://issuer.bench", "aggregator", "bench-caller"
STREAM_CONCURRENCY = 16  # the load generator's callers while the stream rows run


@dataclass(frozen=True, slots=True)
class Settings:
    """How long each row runs: ``quick`` (the test's) is a tenth of the calls, 3 repeats."""

    quick: bool = False

    def calls(self, full: int) -> int:
        return max(10, full // 10) if self.quick else full

    @property
    def repeats(self) -> int:
        return 3 if self.quick else 5


@dataclass(frozen=True, slots=True)
class Row:
    key: str
    us: float | None  # None: not measured (``covers`` says why)
    per: str  # aggregate, target or request
    covers: str
    # How many of it one flat5x20ms aggregate costs in the total; 0 for a comparison row.
    in_total: int = 1


@dataclass(slots=True)
class Budgets:
    rows: list[Row] = field(default_factory=list)

    def add(self, key: str, us: float | None, per: str, covers: str, in_total: int = 1) -> float:
        self.rows.append(Row(key, None if us is None else round(us, 2), per, covers, in_total))
        return us or 0.0

    def total(self) -> float:
        return round(sum((row.us or 0.0) * row.in_total for row in self.rows), 1)


# Timing -------------------------------------------------------------------------------------


def cpu_us(work: Callable[[], object], calls: int, repeats: int) -> float:
    """Median CPU microseconds of one ``work()``, warm."""
    for _ in range(max(1, calls // 5)):
        work()
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(calls):
            work()
        samples.append((time.process_time() - started) / calls)
    return statistics.median(samples) * 1e6


async def acpu_us(work: Callable[[], Awaitable[object]], calls: int, repeats: int) -> float:
    """Median CPU microseconds of one ``await work()``, warm."""
    for _ in range(max(1, calls // 5)):
        await work()
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(calls):
            await work()
        samples.append((time.process_time() - started) / calls)
    return statistics.median(samples) * 1e6


async def alternating_us(
    sides: dict[str, Callable[[], Awaitable[object]]], calls: int, repeats: int
) -> dict[str, float]:
    """Like acpu_us for each side, their repeats alternating (the machine's drift is shared)."""
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for work in sides.values():
        for _ in range(max(1, calls // 5)):
            await work()
    for _ in range(repeats):
        for name, work in sides.items():
            started = time.process_time()
            for _ in range(calls):
                await work()
            samples[name].append((time.process_time() - started) / calls)
    return {name: statistics.median(found) * 1e6 for name, found in samples.items()}


# The world the in-process rows run in -------------------------------------------------------


class Immediate:
    """An upstream at the seam that answers at once: what the policy rows wrap."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reply = Reply(True, BODY, http_status=200, content_type="application/json")

    def __repr__(self) -> str:
        return f"<Immediate {self.name}>"

    async def call(self, request: object, timeout: float, request_id: str) -> Reply:
        return self.reply

    async def aclose(self) -> None:
        pass


@dataclass(slots=True)
class World:
    """The bench config's service, its stub-backed upstreams and one finished call."""

    config: Config
    metrics: Metrics
    service: AggregatorService
    endpoints: dict[str, GuardedUpstream]
    stubs: dict[str, Immediate]
    plan: Plan
    call: CallRecord
    offload: Offload


def world(config: Config, offload: Offload) -> World:
    """Call inside the running loop (the service and the policies take it)."""
    callers = config.auth.callers if config.auth else ()
    metrics = Metrics(CollectorRegistry(), config.upstreams, config.aggregates, callers)
    limit = config.server.max_upstream_inflight
    all_upstreams = Bulkhead("all upstreams", limit, "all upstreams busy")
    timers = Timers()
    stubs = {name: Immediate(name) for name in REST_UPSTREAMS}
    endpoints = {
        name: GuardedUpstream(
            Single(stub), config.upstreams[name], metrics.upstream(name), all_upstreams, timers
        )
        for name, stub in stubs.items()
    }
    service = AggregatorService(config, dict(endpoints), metrics, offload)
    plan = make_plan(SCENARIO.request_for("aggregator"), config)
    return World(config, metrics, service, endpoints, stubs, plan, finished_call(plan), offload)


def finished_call(plan: Plan) -> CallRecord:
    """A call of ``plan`` that ended OK, as _observe and the admin page get it."""
    results = results_of(plan)
    budget = Budget(seconds=5.0, started=0.0, stop_at=4.75, started_ns=0)
    call = CallRecord(REQUEST_ID, AD_HOC, len(results), budget, plan=plan, reported=results)
    call.elapsed_ns, call.first_at_ns, call.fanin_ns = 21_300_000, 20_100_000, 1_200_000
    return call


def results_of(plan: Plan) -> list[pb.TargetResult]:
    reply = Immediate("u").reply
    started, ended = 100_000, 20_100_000
    results = [answered(t, reply, 0, started + i, ended + i) for i, t in enumerate(plan.targets)]
    for result in results:
        result.attempts = 1
    return results


def bench_config(
    http_urls: dict[str, str], grpc_address: str, auth: dict[str, Any] | None
) -> Config:
    mapping = aggregator_config(http_urls, grpc_address, 0, 0)
    if auth is not None:
        mapping["auth"] = auth
    return config_from_mapping(mapping)


def auth_section(directory: Path) -> tuple[dict[str, Any], tuple[tuple[str, str], ...]]:
    """auth with a bearer JWT (RS256) and one caller with both quotas, and its metadata."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = directory / "issuer.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    issued = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": SUBJECT, "iat": issued, "exp": issued + 3600}
    token = jwt.encode(claims, key, algorithm="RS256")
    caller = {
        "token_subject": SUBJECT,
        "upstreams": ["*"],
        "aggregates": ["*"],
        "max_concurrent_calls": 1000,
        "rate_limit": {"rate": 1e9, "burst": 1_000_000},
    }
    section = {
        "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "keys": [str(public)]},
        "callers": {"bench": caller},
    }
    return section, (*METADATA, ("authorization", f"Bearer {token}"))


# In-process rows ----------------------------------------------------------------------------


def planning(rows: Budgets, w: World, s: Settings) -> None:
    service, state = w.service, w.service.state
    ad_hoc = SCENARIO.request_for("aggregator")
    named_scenario = SCENARIOS["named-page5"]
    named_request = named_scenario.request_for("aggregator")
    named = state.catalog.get(named_request.aggregate)
    rows.add(
        "planning",
        cpu_us(
            lambda: service._checked_plan(state, ad_hoc, None, None, METADATA),
            s.calls(1000),
            s.repeats,
        ),
        "aggregate",
        "the five-target request checked and planned: server._checked_plan (make_plan, "
        "forward_caller_metadata, plan_problems), auth off",
    )
    rows.add(
        "planning, named aggregate",
        cpu_us(
            lambda: service._checked_plan(state, named_request, named, None, METADATA),
            s.calls(1000),
            s.repeats,
        ),
        "aggregate",
        "named-page5 called by name: its plan (made at config load) bound to the parameter, "
        "then the same outbound checks",
        in_total=0,
    )


async def admission(
    rows: Budgets, w: World, authed: World, metadata: Sequence[tuple[str, str]], s: Settings
) -> None:
    """What every call pays before planning; with auth, the caller proven and authorized."""
    request = SCENARIO.request_for("aggregator")

    async def entry(world: World, meta: Sequence[tuple[str, str]]) -> None:
        service, state = world.service, world.service.state
        CallRecord(
            server._request_id(meta),
            AD_HOC,
            TARGETS,
            Budget.for_call(None, state.config.server, 0.0),
        )
        hops.enter(meta)
        caller = state.gate.identify(meta, {}) if state.gate.enabled else None
        service._admit()
        quota = await service._quotas.admit(caller)
        if caller is not None:
            state.gate.authorize_calls(caller, server._named_calls(request))
        # What _aggregate's finally undoes.
        service._quotas.release(quota)
        service.inflight -= 1
        world.metrics.inflight.dec()

    rows.add(
        "admission",
        await acpu_us(lambda: entry(w, METADATA), s.calls(4000), s.repeats),
        "aggregate",
        "auth off (the bench config): request id, call record and budget, hops.enter, "
        "_admit and its release",
    )
    rows.add(
        "admission and auth",
        await acpu_us(lambda: entry(authed, metadata), s.calls(200), s.repeats),
        "aggregate",
        "the same with auth on: Gate.identify verifying a bearer JWT (RS256, 2048-bit key), "
        "the caller's quota (max_concurrent_calls and rate_limit), authorize_calls over the "
        "five targets' upstreams",
        in_total=0,
    )


async def policies(rows: Budgets, w: World, s: Settings) -> float:
    """GuardedUpstream.call around an upstream that answers at once, less that upstream."""
    target = w.plan.targets[0]
    guarded, stub = w.endpoints[target.upstream.name], w.stubs[target.upstream.name]
    loop = asyncio.get_running_loop()

    async def through_policies() -> None:
        await guarded.call(
            target.request,
            idempotent=True,
            deadline=loop.time() + 5.0,
            deadline_reason="the call's deadline",
            request_id=REQUEST_ID,
        )

    async def stub_alone() -> None:
        await stub.call(target.request, 1.0, REQUEST_ID)

    took = await alternating_us(
        {"guarded": through_policies, "stub": stub_alone}, s.calls(2000), s.repeats
    )
    rows.add(
        "policies",
        took["guarded"] - took["stub"],
        "target",
        "GuardedUpstream.call (deadline, breaker, bulkhead and the all-upstreams cap, attempt "
        "timer, attempt counter and duration histogram) around an upstream answering at "
        "once, less that upstream",
        in_total=TARGETS,
    )
    return took["guarded"]


def results(rows: Budgets, w: World, s: Settings) -> float:
    reply = w.stubs["u0"].reply
    targets = w.plan.targets

    def build() -> list[pb.TargetResult]:
        built = []
        for index, target in enumerate(targets):
            result = answered(target, reply, 0, 100_000 + index, 20_100_000 + index)
            result.attempts = 1
            result.cache = pb.CACHE_STATUS_UNSPECIFIED
            built.append(result)
        return built

    def build_and_serialize() -> None:
        for result in build():
            result.SerializeToString()

    built = cpu_us(build, s.calls(1000), s.repeats)
    rows.add(
        "result encoding",
        cpu_us(build_and_serialize, s.calls(1000), s.repeats),
        "aggregate",
        "five TargetResults built (results.answered, a 560-byte body each) and serialized "
        "as grpc's response serializer does",
    )
    made = results_of(w.plan)
    rows.add(
        "trailers",
        cpu_us(lambda: trailers(made, 5.0, 0.0213), s.calls(4000), s.repeats),
        "aggregate",
        "the trailing metadata of an OK call (trailers.trailers)",
    )
    return built


async def fan_out(
    rows: Budgets, w: World, s: Settings, guarded_us: float, build_us: float, counters_us: float
) -> None:
    """The fan-out's own machinery: a whole Aggregation.run less what other rows count."""
    loop = asyncio.get_running_loop()
    server_config = w.config.server

    async def discard(result: pb.TargetResult) -> None:
        pass

    async def aggregate() -> None:
        budget = Budget.for_call(None, server_config, loop.time())
        decoder = CallDecoder(w.offload, server_config.max_decoded_bytes)
        await Aggregation(w.plan, w.endpoints, budget, REQUEST_ID, decoder).run(discard)

    whole = await acpu_us(aggregate, s.calls(600), s.repeats)
    rows.add(
        "fan-out",
        whole - TARGETS * guarded_us - build_us - counters_us,
        "aggregate",
        "Aggregation.run's own work (a task per target, the inbox, the deadline timer, "
        f"reporting): a whole run to stub upstreams ({whole:.1f} µs) less the policies, the "
        "results built and the per-target counters (rows above: a difference of medians)",
    )


def observe(rows: Budgets, w: World, s: Settings) -> float:
    """_observe's three parts, each alone: metrics, the log line, the admin record."""
    service, call = w.service, w.call
    counters = [w.endpoints[t.upstream.name].metrics.targets[pb.OUTCOME_OK] for t in w.plan.targets]

    def count_targets() -> None:
        for counter in counters:
            counter.inc()

    def metrics() -> None:
        count_targets()
        service._observe(call)

    counted = cpu_us(count_targets, s.calls(4000), s.repeats)
    with _log_level(logging.WARNING):  # _observe's log line off: the next rows time it
        rows.add(
            "metrics",
            cpu_us(metrics, s.calls(4000), s.repeats),
            "aggregate",
            "the five per-target outcome counters (Aggregation._report) and _observe's metrics "
            "(calls by code, call duration, overhead, fan-in); per-attempt metrics are in "
            "policies",
        )
    for log_format in ("text", "json"):
        with _logging_to_null(log_format):
            rows.add(
                f"logging ({log_format})",
                cpu_us(
                    lambda: server._log_call(call, call.reported, 1_200_000, "t4"),
                    s.calls(2000),
                    s.repeats,
                ),
                "aggregate",
                f"the call's one log line through the real {log_format} formatter "
                "(logs.configure) to a null sink",
                in_total=1 if log_format == "text" else 0,
            )
    recent = Recent(w.config.server.admin_recent, w.config.upstreams)
    ids = itertools.count()

    def record() -> None:
        call.request_id = f"{next(ids):032x}"
        recent.record(call)

    rows.add(
        "admin record",
        cpu_us(record, s.calls(2000), s.repeats),
        "aggregate",
        "Recent.record of the call (the admin page is on in the bench config)",
    )
    call.request_id = REQUEST_ID
    return counted


@contextlib.contextmanager
def _log_level(level: int) -> Iterator[None]:
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)


@contextlib.contextmanager
def _logging_to_null(log_format: str) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with open(os.devnull, "w") as sink:
        logs.configure(log_format, "info")
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(sink)
        try:
            yield
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)


def tracing_rows(rows: Budgets, w: World, s: Settings) -> None:
    """The spans of one aggregate: the call's, and one per attempt with its traceparent."""
    requests = [(t.upstream.name, t.request) for t in w.plan.targets]
    reply = w.stubs["u0"].reply

    def spans() -> None:
        with tracing.aggregate_span("Aggregate", REQUEST_ID, METADATA) as span:
            for name, request in requests:
                with tracing.attempt_span(name, "http") as attempt:
                    endpoint._traced(request)
                    if attempt is not None:
                        tracing.annotate(attempt, endpoint._reply_attributes(reply))
            if span is not None:
                tracing.annotate(span, server._span_attributes(w.call))

    rows.add(
        "tracing off",
        cpu_us(spans, s.calls(4000), s.repeats),
        "aggregate",
        "tracing.aggregate_span, five attempt_spans and their outgoing headers, tracing off",
    )
    provider = _recording_provider()
    if provider is None:
        rows.add(
            "tracing on", None, "aggregate", "not measured: opentelemetry-sdk is not installed", 0
        )
        return
    tracing.enable(provider)
    try:
        took = cpu_us(spans, s.calls(400), s.repeats)
    finally:
        tracing.disable()
        provider.shutdown()
    rows.add(
        "tracing on",
        took,
        "aggregate",
        "the same with tracing on: six spans recorded (sampled), traceparent injected into "
        "each attempt's request; the batch processor's export discarded (not counted)",
        in_total=0,
    )


def _recording_provider() -> Any:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        return None

    class Discarding(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    # As tracing.provider_for makes it, with an exporter that sends nothing.
    provider = TracerProvider(
        resource=Resource.create({"service.name": "aggregator"}),
        sampler=ParentBased(TraceIdRatioBased(1.0)),
    )
    provider.add_span_processor(BatchSpanProcessor(Discarding()))
    return provider


# Rows over loopback -------------------------------------------------------------------------


def _requests(config: Config, targets: list[pb.Target]) -> list[HttpRequest | GrpcRequest]:
    plan = make_plan(pb.AggregateRequest(targets=targets), config)
    return [target.request for target in plan.targets]


async def transport(
    rows: Budgets, config: Config, urls: dict[str, str], grpc_address: str, s: Settings
) -> None:
    """One request per REST upstream, five at once (as an aggregate sends them), answered at
    once by bench/upstreams.py in its own process; ours against aiohttp's client."""
    http_targets = [
        pb.Target(id=f"t{i}", http=pb.HttpCall(upstream=name, path="/delay/0"))
        for i, name in enumerate(REST_UPSTREAMS)
    ]
    http_requests = _requests(config, http_targets)
    ours = [HttpUpstream(config.upstreams[name]) for name in REST_UPSTREAMS]
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=CONNECTIONS_PER_UPSTREAM)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))
    their_urls = [f"{urls[name]}/delay/0" for name in REST_UPSTREAMS]

    async def with_ours() -> None:
        await asyncio.gather(
            *(u.call(r, 5.0, REQUEST_ID) for u, r in zip(ours, http_requests, strict=True))
        )

    async def fetch(url: str) -> bytes:
        async with session.get(url) as response:
            return await response.read()

    async def with_aiohttp() -> None:
        await asyncio.gather(*(fetch(url) for url in their_urls))

    try:
        took = await alternating_us(
            {"ours": with_ours, "aiohttp": with_aiohttp}, s.calls(120), s.repeats
        )
    finally:
        await session.close()
        for upstream in ours:
            await upstream.aclose()
    rows.add(
        "transport REST",
        took["ours"] / TARGETS,
        "request",
        "HttpUpstream.call on its HTTP/1.1 pool (aggregator/upstreams/http1.py): request "
        "written, 560-byte answer read, keep-alive; five at once through asyncio.gather",
        in_total=TARGETS,
    )
    rows.add(
        "transport REST, aiohttp",
        took["aiohttp"] / TARGETS,
        "request",
        "the same requests through one aiohttp.ClientSession (the naive peer's client): "
        "for comparison",
        in_total=0,
    )
    await grpc_transport(rows, config, grpc_address, s)


async def grpc_transport(rows: Budgets, config: Config, grpc_address: str, s: Settings) -> None:
    call = pb.GrpcCall(upstream="g0", method=DELAY_METHOD, request=b"0")
    request = _requests(config, [pb.Target(id="t0", grpc=call)])[0]
    ours = GrpcUpstream(config.upstreams["g0"])
    channel = grpc.aio.insecure_channel(grpc_address)
    stub = channel.unary_unary(DELAY_METHOD)  # type: ignore[call-arg]  # bytes both ways

    async def with_ours() -> None:
        await asyncio.gather(*(ours.call(request, 5.0, REQUEST_ID) for _ in range(TARGETS)))

    async def with_stub() -> None:
        await asyncio.gather(*(stub(b"0", timeout=5.0) for _ in range(TARGETS)))

    try:
        took = await alternating_us({"ours": with_ours, "stub": with_stub}, s.calls(80), s.repeats)
    finally:
        await channel.close(None)
        await ours.aclose()
    rows.add(
        "transport gRPC",
        took["ours"] / TARGETS,
        "request",
        "GrpcUpstream.call (aggregator/upstreams/grpc.py), bytes in and out, five at once: "
        "not in the total (flat5x20ms is REST)",
        in_total=0,
    )
    rows.add(
        "transport gRPC, plain stub",
        took["stub"] / TARGETS,
        "request",
        "a plain grpc.aio unary-unary call on one channel to the same server: for comparison",
        in_total=0,
    )


class Streamer:
    """An Aggregate handler that writes ``count`` ready-serialized results and returns."""

    def __init__(self, results: list[pb.TargetResult]) -> None:
        self.messages = [result.SerializeToString() for result in results]
        self.count = 0

    def __repr__(self) -> str:
        return f"<Streamer writing {self.count} of {len(self.messages)}>"

    async def aggregate(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> None:
        for message in self.messages[: self.count]:
            await context.write(message)


async def streaming(rows: Budgets, w: World, log_dir: Path, s: Settings) -> None:
    """grpc.aio's server side: a call writing five results against one writing none, driven by
    bench/load.py from its own process (so this process's CPU is the server's)."""
    streamer = Streamer(results_of(w.plan))
    handler = grpc.unary_stream_rpc_method_handler(streamer.aggregate)
    service = grpc.method_handlers_generic_handler(server.SERVICE_NAME, {"Aggregate": handler})
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((service,))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    load = Child("budget-load", python_module("bench.load"), log_dir, None, stdin=subprocess.PIPE)
    target = f"127.0.0.1:{port}"
    try:
        await asyncio.to_thread(load.ask, {"op": "ready", "target": target, "timeout": 20}, 30)
        took = await _stream_rounds(streamer, load, target, s)
    finally:
        await asyncio.to_thread(load.stop)
        await grpc_server.stop(None)
    rows.add(
        "streaming",
        took[TARGETS] - took[0],
        "aggregate",
        "five results written to the stream (context.write, already serialized): a grpc.aio "
        f"call writing five less one writing none, at {STREAM_CONCURRENCY} concurrent callers",
    )
    rows.add(
        "grpc.aio call",
        took[0],
        "aggregate",
        "the server side of a unary-stream call that writes nothing (receive, handler task, "
        "status): what every grpc.aio server pays, the floor's own cost",
    )


async def _stream_rounds(
    streamer: Streamer, load: Child, target: str, s: Settings
) -> dict[int, float]:
    samples: dict[int, list[float]] = {TARGETS: [], 0: []}
    calls = s.calls(400)
    for round_ in range(s.repeats + 1):  # the first round warms up
        for count in samples:
            streamer.count = count
            command = {
                "op": "run", "target": target, "scenario": SCENARIO.name, "side": "naive",
                "concurrency": STREAM_CONCURRENCY, "max_calls": calls, "seconds": 60.0,
                "warmup": False,
            }  # fmt: skip
            started = time.process_time()
            answer = await asyncio.to_thread(load.ask, command, 90)
            used = time.process_time() - started
            done = len(answer["latency_ms"])
            if answer["errors"] or not done:
                raise RuntimeError(f"the stream rows' calls failed: {answer['errors']}")
            if round_:
                samples[count].append(used / done)
    return {count: statistics.median(found) * 1e6 for count, found in samples.items()}


# The run ------------------------------------------------------------------------------------


async def measure(settings: Settings, directory: Path) -> Budgets:
    upstreams = Child("budget-upstreams", python_module("bench.upstreams"), directory, None)
    rows = Budgets()
    offload = Offload()
    try:
        ports = await asyncio.to_thread(upstreams.read_line, 60)
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports["http_ports"].items()}
        grpc_address = f"127.0.0.1:{ports['grpc_port']}"
        config = bench_config(urls, grpc_address, None)
        auth, auth_metadata = auth_section(directory)
        w = world(config, offload)
        authed = world(bench_config(urls, grpc_address, auth), offload)
        planning(rows, w, settings)
        await admission(rows, w, authed, auth_metadata, settings)
        guarded_us = await policies(rows, w, settings)
        build_us = results(rows, w, settings)
        counters_us = observe(rows, w, settings)
        await fan_out(rows, w, settings, guarded_us, build_us, counters_us)
        tracing_rows(rows, w, settings)
        await transport(rows, config, urls, grpc_address, settings)
        await streaming(rows, w, directory, settings)
    finally:
        offload.close()
        await asyncio.to_thread(upstreams.stop)
    return rows


def report(
    rows: Budgets, settings: Settings, started: float, load_before: Sequence[float]
) -> dict[str, Any]:
    return {
        "date": now(),
        "machine": machine(),
        "versions": versions(),
        "scenario": SCENARIO.name,
        "quick": settings.quick,
        "repeats": settings.repeats,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "rows": {
            row.key: {"us": row.us, "per": row.per, "in_total": row.in_total, "covers": row.covers}
            for row in rows.rows
        },
        "total_us_per_aggregate": rows.total(),
        "duration_s": round(time.monotonic() - started, 1),
    }


def markdown(budget: dict[str, Any]) -> str:
    """The table docs/performance.md shows ("CPU budget")."""
    lines = ["| row | µs | per | in total | what it covers |", "|---|---|---|---|---|"]
    for key, row in budget["rows"].items():
        us = "not measured" if row["us"] is None else f"{row['us']:,.1f}"
        counted = str(row["in_total"]) if row["in_total"] else "no"
        lines.append(f"| {key} | {us} | {row['per']} | {counted} | {row['covers']} |")
    total = budget["total_us_per_aggregate"]
    lines.append(
        f"| **total** | **{total:,.1f}** | aggregate | | the rows in the total, each as many "
        "times as one flat5x20ms aggregate pays it |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few calls a row")
    parser.add_argument(
        "--output",
        type=Path,
        help="a JSON file to merge the figures into, under cpu_budget (made if missing)",
    )
    args = parser.parse_args(argv)
    settings = Settings(quick=args.quick)
    started, load_before = time.monotonic(), os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="budget-") as tmp,
        asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner,
    ):
        rows = runner.run(measure(settings, Path(tmp)))
    budget = report(rows, settings, started, load_before)
    print(markdown(budget))
    if args.output is not None:
        document = json.loads(args.output.read_text()) if args.output.exists() else {}
        document["cpu_budget"] = budget
        args.output.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nmerged into {args.output} (cpu_budget)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
