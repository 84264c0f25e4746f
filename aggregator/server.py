"""The Aggregator service: Aggregate, Collect and ListAggregates, each call checked, planned,
fanned out and observed at one boundary (lifecycle.py runs it inside the process).

A call is checked in this order before anything is sent upstream: how many aggregators it
came through (FAILED_PRECONDITION, security/hops.py), who is calling (UNAUTHENTICATED),
admission, the caller's quota (RESOURCE_EXHAUSTED, policies/quotas.py), ad-hoc targets where
only named aggregates may run (PERMISSION_DENIED, server.allow_ad_hoc), which named aggregate or
which upstreams the request names that the caller may not run or call (PERMISSION_DENIED: one
pass over the request as received, so an unauthorized caller costs no planning), the request
itself or the named aggregate's parameters
(INVALID_ARGUMENT), then each upstream's rules on what reaches it (INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from aggregator import tracing
from aggregator.admin.recent import Recent
from aggregator.aggregates import Catalog, NamedAggregate
from aggregator.call_record import CallRecord
from aggregator.config import Config
from aggregator.decoding import CallDecoder
from aggregator.errors import CallFailure, InvalidRequest, quota_failure, retry_info
from aggregator.fanout import Aggregation, Budget, Emit
from aggregator.grpc_json import typed_plan
from aggregator.metrics import Metrics
from aggregator.offload import Offload
from aggregator.plan import Plan, make_plan
from aggregator.policies.endpoint import GuardedUpstream
from aggregator.policies.quotas import Quotas
from aggregator.reload import State
from aggregator.security import hops
from aggregator.security.auth import Caller, Gate
from aggregator.security.outbound import forward_caller_metadata, plan_problems
from aggregator.trailers import trailers
from aggregator.upstreams.descriptors import Descriptors
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from aggregator.vocabulary import AD_HOC, REQUEST_ID, STATUS_DETAILS

log = logging.getLogger("aggregator")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Aggregator"].full_name
_DRAIN_QUIET = 0.2  # seconds without a new call before grpc is stopped (drain)


# A request protobuf cannot parse (it nests JSON values past protobuf's 100 message levels, or
# is not an AggregateRequest at all) would become UNKNOWN "Unexpected <class DecodeError>" from
# grpc itself: it is handed to the handler as this one object instead, and refused there.
UNDECODABLE = pb.AggregateRequest()
UNDECODABLE_PROBLEM = (
    "request: not a valid AggregateRequest (malformed, or JSON values nested deeper than "
    "protobuf's limit of 100 message levels)"
)


def _parse_request(raw: bytes) -> pb.AggregateRequest:
    try:
        return pb.AggregateRequest.FromString(raw)
    except DecodeError:
        return UNDECODABLE


def add_aggregator(service: AggregatorService, server: grpc.aio.Server) -> None:
    """The generated registration (aggregator_pb2_grpc), with ``_parse_request`` as the parser."""
    handlers = {
        "Aggregate": grpc.unary_stream_rpc_method_handler(
            service.Aggregate,
            request_deserializer=_parse_request,
            response_serializer=pb.TargetResult.SerializeToString,
        ),
        "Collect": grpc.unary_unary_rpc_method_handler(
            service.Collect,
            request_deserializer=_parse_request,
            response_serializer=pb.CollectResponse.SerializeToString,
        ),
        "ListAggregates": grpc.unary_unary_rpc_method_handler(
            service.ListAggregates,
            request_deserializer=pb.ListAggregatesRequest.FromString,
            response_serializer=pb.ListAggregatesResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


class AggregatorService(pb_grpc.AggregatorServicer):
    """Aggregate and Collect; the one place where failures become gRPC statuses."""

    def __init__(
        self,
        config: Config,
        endpoints: dict[str, GuardedUpstream],
        metrics: Metrics,
        offload: Offload,
        gate: Gate | None = None,
        catalog: Catalog | None = None,
        descriptors: Mapping[str, Descriptors] | None = None,
        recent: Recent | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        # What each call runs with, taken at its start (a reload swaps it: aggregator/reload.py):
        # the config, the named aggregates planned once (config load planned them too, to check
        # them), the gate, the upstreams and the gRPC upstreams' descriptors, for targets in
        # JSON (aggregator/grpc_json.py).
        self.state = State(
            config,
            catalog if catalog is not None else Catalog(config),
            gate or Gate(config.auth),
            endpoints,
            descriptors or {},
        )
        # Callers' quotas: per process, as at start (a change needs a restart: reload.py).
        self._quotas = quotas or Quotas(config.auth, None, metrics)
        self._metrics = metrics
        self._offload = offload
        self._loop = asyncio.get_running_loop()
        self.inflight = 0
        self.draining = False
        self._shed = 0
        self._shed_logged_at = -1.0
        self.grace_ends_at: float | None = None  # loop time: drain() cuts what outlives it
        self._idle: asyncio.Event | None = None  # set when draining and nothing is in flight
        self._refused = asyncio.Event()  # set by each call refused while draining
        self.recent = recent  # the admin page's record, when it is on

    def __repr__(self) -> str:
        state = "draining" if self.draining else "serving"
        return f"<AggregatorService [{state}, {self.inflight} calls in flight]>"

    @property
    def descriptors(self) -> Mapping[str, Descriptors]:
        return self.state.descriptors

    async def Aggregate(
        self, request: pb.AggregateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        # Results are written as they complete (context.write), not yielded through
        # generators: the stream is the hot path.
        state = self.state
        decoder = CallDecoder(self._offload, state.config.server.max_decoded_bytes)
        await self._run(state, "Aggregate", request, context, context.write, decoder)

    async def Collect(
        self, request: pb.AggregateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CollectResponse:
        response = pb.CollectResponse()
        # One allowance for the call: what decode_json and the merge decode, together.
        state = self.state
        decoder = CallDecoder(self._offload, state.config.server.max_decoded_bytes)

        async def gather(result: pb.TargetResult) -> None:
            await decoder.merge(response.merged, result)
            # A copy: as long as decoding the body was, for a large one.
            await decoder.run(len(result.body), response.results.append, result)

        await self._run(state, "Collect", request, context, gather, decoder)
        return response

    async def ListAggregates(
        self, request: pb.ListAggregatesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAggregatesResponse:
        """The named aggregates the caller may run (all of them when auth is off)."""
        metadata: Sequence[tuple[str, Any]] = context.invocation_metadata() or ()  # type: ignore[assignment]
        state = self.state
        try:
            caller = self._identify(state, context, metadata)
        except CallFailure as refused:
            context.set_trailing_metadata(((STATUS_DETAILS, refused.status_details()),))
            await context.abort(refused.code, refused.sent_message)
        return state.catalog.infos(lambda name: caller is None or caller.may_run(name))

    def _identify(
        self,
        state: State,
        context: grpc.aio.ServicerContext[Any, Any],
        metadata: Sequence[tuple[str, Any]],
    ) -> Caller | None:
        """Who is calling (None when auth is off); CallFailure UNAUTHENTICATED if unproven."""
        if not state.gate.enabled:
            return None
        return state.gate.identify(metadata, context.auth_context() or {})

    async def _run(
        self,
        state: State,
        method: str,
        request: pb.AggregateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        emit: Emit,
        decoder: CallDecoder,
    ) -> None:
        # (key, value) pairs on the server side, whatever grpc-stubs says.
        metadata: Sequence[tuple[str, Any]] = context.invocation_metadata() or ()  # type: ignore[assignment]
        named = state.catalog.get(request.aggregate) if request.aggregate else None
        call = CallRecord(
            request_id=_request_id(metadata),
            # The metric label and the log's name: only ever a configured name, or ad_hoc.
            aggregate=named.name if named is not None else AD_HOC,
            requested=len(named.plan.targets) if named is not None else len(request.targets),
            budget=Budget.for_call(
                context.time_remaining(), state.config.server, self._loop.time()
            ),
        )
        state.calls += 1  # held to the call's end, when its upstreams may be closed
        with tracing.aggregate_span(method, call.request_id, metadata) as span:
            try:
                await self._aggregate(state, call, request, named, context, metadata, emit, decoder)
            finally:
                state.leave()
                if span is not None:
                    tracing.annotate(span, _span_attributes(call))

    async def _aggregate(
        self,
        state: State,
        call: CallRecord,
        request: pb.AggregateRequest,
        named: NamedAggregate | None,
        context: grpc.aio.ServicerContext[Any, Any],
        metadata: Sequence[tuple[str, Any]],
        emit: Emit,
        decoder: CallDecoder,
    ) -> None:
        await context.send_initial_metadata((("x-request-id", call.request_id),))
        budget = call.budget
        try:
            hops.enter(metadata)  # a loop through gRPC upstreams that are aggregators ends here
            call.caller = self._identify(state, context, metadata)
            self._admit()
            quota = None
            try:
                quota = await self._quotas.admit(call.caller)  # QuotaExceeded: none planned
                # Planning reads every JSON payload and parameter: a large request is planned
                # off the loop, on the one bounded executor (docs/security.md).
                plan = await self._offload.run(
                    request.ByteSize(), self._checked_plan, state, request, named, call.caller,
                    metadata,
                )  # fmt: skip
                # Recorded as configured: a named aggregate's paths before params filled them.
                call.plan = named.plan if named is not None else plan
                plan = await typed_plan(plan, state.descriptors, budget.stop_at, self._offload)
                aggregation = Aggregation(plan, state.endpoints, budget, call.request_id, decoder)
                call.reported, call.cut = aggregation.reported.values(), aggregation.left_unreported
                call.unsent = aggregation.unsent
                try:
                    # Cut at the end of the budget by the fan-out itself (CallFailure
                    # RESULTS_NOT_READ): it ends by itself before, at budget minus the margin,
                    # unless writing a result waits that long: a caller that does not read its
                    # stream holds up grpc's flow control, and with no deadline of its own
                    # would hold the call and its results for ever.
                    await aggregation.run(emit)
                finally:
                    call.first_at_ns, call.failure = aggregation.first_at, aggregation.failure
                    # Only the results written stay with the call: the status of a caller
                    # that does not read waits behind them, and this frame with it.
                    del aggregation
            finally:
                self._quotas.release(quota)
                self.inflight -= 1
                self._metrics.inflight.dec()
                if self._idle is not None and not self.inflight:
                    self._idle.set()
        except CallFailure as refused:
            call.failure = refused
        except asyncio.CancelledError:  # the caller went away, or the shutdown's grace ran out
            call.elapsed_ns = time.perf_counter_ns() - budget.started_ns
            call.failure = self._cancellation()
            self._observe(call)
            raise
        ended = time.perf_counter_ns()
        call.elapsed_ns = ended - budget.started_ns
        if call.first_at_ns is not None:
            call.fanin_ns = ended - call.first_at_ns
        failure = call.failure
        context.set_trailing_metadata(
            trailers(call.reported, budget.seconds, call.elapsed_ns / 1e9, failure)
        )
        # The log line and metrics after the status has gone: like an access log, they need not
        # hold the caller's answer (the handler returns, grpc sends the status, then this runs).
        self._loop.call_soon(self._observe, call)
        if failure is not None:
            await context.abort(failure.code, failure.sent_message)

    def _checked_plan(
        self,
        state: State,
        request: pb.AggregateRequest,
        named: NamedAggregate | None,
        caller: Caller | None,
        metadata: Sequence[tuple[str, Any]],
    ) -> Plan:
        """The plan, once the caller may run it and every upstream accepts what it would get."""
        if request is UNDECODABLE:
            raise InvalidRequest([UNDECODABLE_PROBLEM])
        if request.aggregate or request.HasField("params"):
            plan = self._named_plan(state, request, named, caller)
        else:
            if not state.config.server.allow_ad_hoc:
                raise CallFailure(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "targets: this server runs named aggregates only (server.allow_ad_hoc is "
                    "false); set aggregate (ListAggregates lists them)",
                )
            if caller is not None:  # None: auth is off (a pass over the targets saved)
                state.gate.authorize_calls(caller, _named_calls(request))
            plan = make_plan(request, state.config)
        plan = forward_caller_metadata(plan, metadata)
        problems = plan_problems(plan)
        if problems:
            raise InvalidRequest(problems)
        return plan

    def _named_plan(
        self,
        state: State,
        request: pb.AggregateRequest,
        named: NamedAggregate | None,
        caller: Caller | None,
    ) -> Plan:
        """A named aggregate's plan, bound to the request's params (nothing else is planned)."""
        if request.targets:
            raise InvalidRequest(["targets and aggregate: set one of them, not both"])
        if not request.aggregate:
            raise InvalidRequest(["params: given without aggregate (params fill a named one)"])
        state.gate.authorize_aggregate(caller, request.aggregate)
        if named is None:  # the name is the caller's: not repeated (docs/security.md)
            raise InvalidRequest(
                ["aggregate: not a configured aggregate (ListAggregates lists them)"]
            )
        return named.bind(request.params)

    async def drain(self, grace_ends_at: float) -> None:
        """Refuses every new call with UNAVAILABLE from now on, and returns once no call is in
        flight or at ``grace_ends_at`` (loop time), whichever comes first.

        grpc's own stop cancels the calls it has received but not yet handed to a handler: were
        it called first, a call that arrived during the drain would get CANCELLED instead of
        the UNAVAILABLE a client retries elsewhere (docs/operations.md)."""
        self.draining = True
        self.grace_ends_at = grace_ends_at
        self._idle = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(grace_ends_at):
                if self.inflight:
                    await self._idle.wait()
                await self._quiet()

    async def _quiet(self) -> None:
        """Returns once no call has been refused for _DRAIN_QUIET: callers still sending have
        calls waiting in grpc that its stop would end CANCELLED (docs/operations.md)."""
        while True:
            self._refused.clear()
            try:
                async with asyncio.timeout(_DRAIN_QUIET):
                    await self._refused.wait()
            except TimeoutError:
                return

    def _cancellation(self) -> CallFailure:
        """Why a call was cancelled: the end of the shutdown's grace, or else the caller."""
        # grpc cancels at the same loop time or later; the millisecond allows for its rounding.
        if self.grace_ends_at is not None and self._loop.time() >= self.grace_ends_at - 0.001:
            grace = self.state.config.server.shutdown_grace
            return CallFailure(  # what grpc answers the caller then
                grpc.StatusCode.UNAVAILABLE,
                f"cut by shutdown: server.shutdown_grace ({grace:g}s) ran out",
            )
        return CallFailure(grpc.StatusCode.CANCELLED, "the caller cancelled")

    def _observe(self, call: CallRecord) -> None:
        """The metrics, the one log line and the admin page's record of a call that ended."""
        metrics = self._metrics
        code = call.code
        metrics.calls_by_code[call.aggregate][code].inc()
        if isinstance(call.failure, InvalidRequest):
            metrics.rejected_by["invalid_argument"].inc()
        elapsed = call.elapsed_ns
        metrics.call_duration_of[call.aggregate].observe(elapsed / 1e9)
        results = call.results()
        slowest, longest = None, -1
        for result, nanos in zip(results, call.latencies_ns(), strict=True):
            if nanos > longest:
                slowest, longest = result, nanos
        # A target cut by the deadline counts as having run until the cut: waiting for it is
        # not the aggregator's overhead.
        overhead = max(0, elapsed - longest) if slowest is not None else 0
        if slowest is not None:
            metrics.overhead.observe(overhead / 1e9)
        if call.fanin_ns is not None:
            metrics.fanin_wait.observe(call.fanin_ns / 1e9)
        if log.isEnabledFor(logging.INFO):
            _log_call(call, results, overhead, slowest.id if slowest else "")
        if self.recent is not None:
            self.recent.record(call)

    def _admit(self) -> None:
        """Counts the call in flight, or refuses it (draining, max_concurrent_calls)."""
        if self.draining:
            self._refused.set()
            self._metrics.rejected_by["draining"].inc()
            log.warning("refused a call: draining", extra={"event": "shed", "reason": "draining"})
            raise CallFailure(
                grpc.StatusCode.UNAVAILABLE,
                "the server is shutting down",
                reason="DRAINING",
                details=(retry_info(RETRY_AFTER_REFUSAL),),  # on another replica
            )
        limit = self.state.config.server.max_concurrent_calls
        if self.inflight >= limit:
            self._metrics.rejected_by["max_concurrent_calls"].inc()
            self._log_shed()
            message = f"more than server.max_concurrent_calls ({limit}) calls in flight"
            raise CallFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                message,
                reason="OVERLOADED",
                details=(
                    quota_failure("server.max_concurrent_calls", message),
                    retry_info(RETRY_AFTER_REFUSAL),
                ),
            )
        self.inflight += 1
        self._metrics.inflight.inc()

    def _log_shed(self) -> None:
        """Logs shedding at most once a second: an overload must not become a log flood."""
        self._shed += 1
        now = self._loop.time()
        if now - self._shed_logged_at >= 1.0:
            log.warning(
                "shed %d calls over server.max_concurrent_calls", self._shed,
                extra={"event": "shed", "reason": "max_concurrent_calls", "shed": self._shed},
            )  # fmt: skip
            self._shed, self._shed_logged_at = 0, now


# The RetryInfo of a call refused at admission or while draining: most calls in flight end
# within it, and a draining server's replicas take the retry at once.
RETRY_AFTER_REFUSAL = 0.1


def _span_attributes(call: CallRecord) -> dict[str, int | str]:
    results = call.reported
    failed = sum(r.outcome != pb.OUTCOME_OK for r in results)
    return {"rpc.grpc.status_code": call.code.value[0], "aggregator.targets": len(results),
            "aggregator.failed": failed, "aggregator.aggregate": call.aggregate}  # fmt: skip


def _log_call(
    call: CallRecord, results: Collection[pb.TargetResult], overhead: int, slowest: str
) -> None:
    """The call's one log line: names, counts and timings (the failure's sentence names
    fields, never values: docs/security.md)."""
    code, elapsed = call.code.name, call.elapsed_ns
    outcomes = zip(results, call.outcomes(), strict=True)
    failed = [result.id for result, outcome in outcomes if outcome != pb.OUTCOME_OK]
    log.info(
        "aggregate %s: %s, %d targets, %d results, %d failed, %.3f ms",
        call.request_id, code, call.requested, len(call.reported), len(failed), elapsed / 1e6,
        extra={
            "request_id": call.request_id,
            "aggregate": call.aggregate,
            "code": code,
            "targets": call.requested,
            "results": len(call.reported),
            "failed": ",".join(failed[:20]) + (" ..." if len(failed) > 20 else ""),
            "elapsed_ms": round(elapsed / 1e6, 3),
            "overhead_ms": round(overhead / 1e6, 3),
            "slowest": slowest,
            "error": call.failure.message[:200] if call.failure else "",
        },
    )  # fmt: skip


def _named_calls(request: pb.AggregateRequest) -> Iterator[tuple[str, str]]:
    """(target id, upstream name) for each target naming an upstream, as received."""
    for target in request.targets:
        kind = target.WhichOneof("call")
        if kind is not None:
            upstream = target.http.upstream if kind == "http" else target.grpc.upstream
            if upstream:
                yield target.id, upstream


def _request_id(metadata: Sequence[tuple[str, Any]]) -> str:
    for key, value in metadata:
        if key == "x-request-id" and isinstance(value, str) and REQUEST_ID.match(value):
            return value
    return os.urandom(16).hex()
