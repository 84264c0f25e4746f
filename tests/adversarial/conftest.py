"""The adversarial harness (docs/security.md, "The adversarial harness"): hostile requests against
the real aggregator on loopback, every call under the loop watch (tests/adversarial/watch.py).

Every test here runs with ``watch`` (autouse) and must make its calls inside a watched span
(``adversary.call`` opens one): the span fails the test with BoundExceeded when the event loop
stalled past LOOP_LAG_BOUND or the process's RSS grew past what the bytes read justify.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase, settings

from aggregator.lifecycle import AggregatorServer
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.adversarial.watch import LoopWatch, Span, queued
from tests.conftest import TRAILER_KEYS, collect
from tests.typed_upstreams import Catalog, catalog_upstream, compile_descriptor_set
from tests.upstreams import GrpcUpstream, RawUpstream, RestUpstream, raw_upstream

StartServer = Callable[..., Awaitable[tuple[AggregatorServer, pb_grpc.AggregatorStub]]]

# Where a ruled upstream lets callers go: the odd encodings must not leave it.
PUBLIC = "/echo/public/"


# As in tests/unit/test_fuzz.py: AGGREGATOR_FUZZ=explore draws ten times as many new examples.
EXPLORE = os.environ.get("AGGREGATOR_FUZZ") == "explore"


def bounded(max_examples: int) -> settings:
    """Hypothesis settings for the harness: few examples, the same ones every run (a red
    build reproduces), no per-example deadline (the watch bounds time, not Hypothesis), and
    no shrinking: against a live server it takes minutes, and the example fails as drawn."""
    return settings(
        max_examples=max_examples * (10 if EXPLORE else 1),
        deadline=None,
        derandomize=not EXPLORE,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )


@pytest.fixture(autouse=True)
def watch() -> Iterator[LoopWatch]:
    """The loop watch every adversarial test runs with; each must open at least one span."""
    loop_watch = LoopWatch()
    yield loop_watch
    assert loop_watch.spans, "an adversarial test makes its calls under the watch (adversary.call)"


@dataclass
class Answer:
    results: list[pb.TargetResult]
    code: grpc.StatusCode
    details: str
    trailers: dict[str, Any]
    span: Span
    # Seconds from the call to its last byte, less the time the loop's thread waited for a CPU
    # meanwhile (as the watch counts stalls): what the server took, not what the box's load did.
    elapsed: float

    def by_id(self) -> dict[str, pb.TargetResult]:
        return {result.id: result for result in self.results}


@dataclass
class Adversary:
    """The aggregator under attack, its upstreams, and a way to call it under the watch."""

    server: AggregatorServer
    stub: pb_grpc.AggregatorStub
    rest: RestUpstream
    rpc: GrpcUpstream
    catalog: Catalog
    raw: RawUpstream
    watch: LoopWatch

    def __repr__(self) -> str:
        return f"<Adversary [port {self.server.port}, {self.watch!r}]>"

    async def call(
        self, request: pb.AggregateRequest, answered_bytes: int = 0, timeout: float = 10.0
    ) -> Answer:
        """Aggregate(request) in a watched span that allows for the request's bytes and
        ``answered_bytes`` (what the test's upstreams answer the call's targets)."""
        async with self.watch.span(request.ByteSize() + answered_bytes) as span:
            started, waited = time.perf_counter(), queued()
            results, code, details, trailers = await collect(
                self.stub.Aggregate(request, timeout=timeout)
            )
            elapsed = time.perf_counter() - started - (queued() - waited)
        return Answer(results, code, details, trailers, span, elapsed)

    async def timed(self, request: pb.AggregateRequest, answered_bytes: int = 0) -> float:
        """How long the server takes to answer ``request`` (seconds), under the watch."""
        answer = await self.call(request, answered_bytes)
        assert_clean(request, answer)
        return answer.elapsed


def _required_failure(request: pb.AggregateRequest, answer: Answer) -> bool:
    """A non-OK status that follows a required target's failure (docs/api.md)."""
    failed = {result.id for result in answer.results if result.outcome != pb.OUTCOME_OK}
    return any(
        answer.details.startswith(f"required target {target.id!r} failed")
        for target in request.targets
        if target.required and target.id in failed
    )


def assert_clean(request: pb.AggregateRequest, answer: Answer) -> None:
    """OK with one result per target, a clean INVALID_ARGUMENT (nothing ran), or the status of
    a required target that failed; never UNKNOWN/INTERNAL from a bug, never 'internal error'."""
    code, shown = answer.code, (answer.code, answer.details[:300])
    assert set(answer.trailers) >= TRAILER_KEYS, shown
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert answer.results == [], shown
        assert answer.details, shown
        return
    assert code == grpc.StatusCode.OK or _required_failure(request, answer), shown
    assert not [r.id for r in answer.results if r.error == "internal error"], shown
    if code == grpc.StatusCode.OK:
        _assert_one_result_each(request, answer.results)


def _assert_one_result_each(request: pb.AggregateRequest, results: list[pb.TargetResult]) -> None:
    """One result per target; a for_each target may answer as id[0], id[1], ... instead."""
    seen = [result.id for result in results]
    assert len(seen) == len(set(seen)), seen
    if request.aggregate:  # a named aggregate's ids are the config's
        return
    expanding = {target.id for target in request.targets if target.for_each}
    plain = {target.id for target in request.targets} - expanding
    assert plain <= set(seen), sorted(plain - set(seen))
    for result_id in seen:
        assert result_id in plain or result_id.split("[", 1)[0] in expanding, result_id


@pytest.fixture(scope="session")
def shop_descriptors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_descriptor_set(tmp_path_factory.mktemp("adversarial") / "shop.pb")


@pytest.fixture(scope="session")
def shop_files(shop_descriptors: Path) -> bytes:
    return shop_descriptors.read_bytes()


@pytest.fixture
async def catalog(shop_files: bytes) -> AsyncIterator[Catalog]:
    """The typed gRPC upstream (shop.v1.Catalog), for gRPC targets written in JSON."""
    async with catalog_upstream(shop_files, "none") as upstream:
        yield upstream


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    """A raw TCP upstream; a test sets what it answers: ``raw.scripts[path] = [answer(...)]``."""
    async with raw_upstream({}) as upstream:
        yield upstream


def answer(body: bytes, content_type: str = "application/json") -> bytes:
    """A whole HTTP/1.1 200 answer carrying ``body``, for the raw upstream's scripts."""
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


# A named aggregate whose parameter lands in a JSON body: the params surface.
LOOKUP = {
    "params": {"ids": {"default": []}},
    "targets": [
        {
            "id": "lookup",
            "http": {
                "upstream": "rest",
                "method": "POST",
                "path": "/echo",
                "json": {"ids": "{{params.ids}}"},
            },
        }
    ],
}


@pytest.fixture
async def adversary(
    start_server: StartServer,
    rest: RestUpstream,
    rpc: GrpcUpstream,
    catalog: Catalog,
    raw: RawUpstream,
    shop_descriptors: Path,
    watch: LoopWatch,
) -> Adversary:
    """The aggregator with the default limits, and upstreams for every surface: ``rest`` and
    ``rpc`` (tests/upstreams.py), ``ruled`` (rest behind path_prefixes), ``shop`` (typed gRPC,
    JSON through its descriptor set), ``raw`` (answers what a test scripts) and ``dead`` (a
    refused port); and the named aggregate ``lookup`` (a parameter into a JSON body)."""
    server, stub = await start_server(
        aggregates={"lookup": LOOKUP},
        ruled={"kind": "http", "url": rest.url, "path_prefixes": [PUBLIC]},
        shop={"kind": "grpc", "address": catalog.address, "descriptors": str(shop_descriptors)},
        raw={"kind": "http", "url": raw.url},
    )
    return Adversary(server, stub, rest, rpc, catalog, raw, watch)
