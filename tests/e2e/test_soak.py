"""Soak: slow, failing, flapping and restarting upstreams under concurrent load — nothing lost.

For AGGREGATOR_SOAK_SECONDS (default 20) a dozen clients hammer one aggregator whose upstreams
misbehave on purpose; some callers give up at their deadline, some cancel mid-stream. Every call
must end with a well-formed stream and its trailers; afterwards no task, file descriptor or
memory may be left behind, and every circuit breaker must close again once its upstream heals.
Then the same under SIGTERM: `aggregator serve` drains every call in flight and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from google.protobuf import duration_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.config import config_from_mapping
from aggregator.lifecycle import AggregatorServer
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from bench import soak
from tests.conftest import TRAILER_KEYS, collect, http, rpc_target, wait_for
from tests.upstreams import RestUpstream, free_port, reset_connection

ROOT = Path(__file__).resolve().parents[2]
SOAK_SECONDS = float(os.environ.get("AGGREGATOR_SOAK_SECONDS", "20"))
CLIENTS = 12
BREAKERS = ("slow", "failing", "flapping", "restarting", "rpc")
# Idle keep-alive connections to the REST upstreams close after this; the baseline and the
# final counts are taken once none is open, so a leaked socket or task cannot hide in a pool.
KEEPALIVE = 0.3
# Leeway over the baseline: a socket or a task still on its way out when counted.
TASK_SLACK = 4
FD_SLACK = 6
RSS_GROWTH_MB = 64
# Callers whose own deadline fires before the server's answer arrives, as a share of the calls
# made to expire. The server stops at its budget minus the margin (125-250 ms here), but on
# two cores shared by the load generator, the server and grpc's threads, a full GC or a
# scheduling gap now and then stalls the server for longer than that (loop stalls up to 0.8 s
# measured while other work ran on the machine; 0-2 misses in ~500 on a quiet one). A server
# that did not answer at its deadline would miss on every such call, not a few; and the
# server's own count of finished calls must match the callers' either way.
DEADLINE_MISSES = 0.1


# Upstreams that misbehave on purpose ---------------------------------------------------------


class FaultyUpstream:
    """An aiohttp upstream on loopback: slow, failing, flapping on a flag, and able to stop
    and start again on the same port. Keeps counts only, so it does not grow under load."""

    def __init__(self) -> None:
        self.healthy = True
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def connections(self) -> int:
        """Connections open to this upstream (idle keep-alive ones included)."""
        server = self._runner.server if self._runner else None
        return len(server.connections) if server else 0

    def __repr__(self) -> str:
        state = "up" if self.running else "down"
        return f"<FaultyUpstream :{self.port} [{state}, healthy={self.healthy}]>"

    def _app(self) -> web.Application:
        async def delay(request: web.Request) -> web.Response:
            await asyncio.sleep(int(request.match_info["ms"]) / 1000)
            return web.json_response({"delay_ms": int(request.match_info["ms"])})

        async def status(request: web.Request) -> web.Response:
            return web.json_response({}, status=int(request.match_info["code"]))

        async def flap(request: web.Request) -> web.Response:
            if not self.healthy:
                return web.json_response({"healthy": False}, status=503)
            return await delay(request)

        async def hang(request: web.Request) -> web.Response:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def reset(request: web.Request) -> web.Response:
            return await reset_connection(request)

        app = web.Application()
        app.router.add_get("/delay/{ms}", delay)
        app.router.add_get("/status/{code}", status)
        app.router.add_get("/flap/{ms}", flap)
        app.router.add_get("/hang", hang)
        app.router.add_get("/reset", reset)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=0.2,
            # Idle connections close soon, so "no connection open" is a state the test can
            # wait for before taking its baseline and again at the end.
            keepalive_timeout=KEEPALIVE,
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


def _grpc_handler() -> grpc.GenericRpcHandler:
    async def delay(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await asyncio.sleep(int(request) / 1000)
        return request

    async def fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        code = next(c for c in grpc.StatusCode if c.value[0] == int(request))
        await context.abort(code, f"told to fail with {code.name}")
        raise AssertionError("unreachable")

    methods = {"Delay": delay, "Fail": fail}
    return grpc.method_handlers_generic_handler(
        "test.Upstream",
        {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in methods.items()},
    )


@contextlib.asynccontextmanager
async def grpc_upstream() -> AsyncIterator[str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_grpc_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Waits ``seconds`` or until ``stop`` is set; says whether it was set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def flapping_loop(upstream: FaultyUpstream, rng: random.Random, stop: asyncio.Event) -> None:
    while not await stopped(stop, rng.uniform(0.2, 0.6)):
        upstream.healthy = not upstream.healthy


async def restarting_loop(
    upstream: FaultyUpstream, rng: random.Random, stop: asyncio.Event
) -> None:
    """Stops and restarts ``upstream`` until told to stop; it is left running."""
    while not await stopped(stop, rng.uniform(0.4, 1.0)):
        await upstream.stop()
        await stopped(stop, rng.uniform(0.1, 0.4))
        await upstream.start()


# The process's own footprint -----------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def settle(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Polls ``condition`` until it holds or ``timeout`` passes; says which."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout
    while not condition():
        if loop.time() > give_up:
            return False
        await asyncio.sleep(0.05)
    return True


# The load --------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw; ``problems`` holds every broken promise, one line each."""

    calls: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    deadline_misses: int = 0
    misses: list[str] = field(default_factory=list)  # the first few, described

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)

    def to_json(self) -> str:
        return json.dumps(
            {
                "calls": dict(self.calls),
                "codes": dict(self.codes),
                "outcomes": dict(self.outcomes),
                "problems": self.problems,
                "deadline_misses": self.deadline_misses,
                "misses": self.misses,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Tally:
        raw = json.loads(text)
        return cls(
            calls=Counter(raw["calls"]),
            codes=Counter(raw["codes"]),
            outcomes=Counter(raw["outcomes"]),
            problems=raw["problems"],
            deadline_misses=raw["deadline_misses"],
            misses=raw["misses"],
        )


def pick_targets(rng: random.Random, mode: str) -> list[pb.Target]:
    """One to five targets across every kind of misbehaviour. ``required`` only where a failure
    maps to a status other than UNKNOWN/INTERNAL, so those two always mean a bug."""
    menu: list[Callable[[str], pb.Target]] = [
        lambda i: http(i, f"/delay/{rng.randint(1, 120)}", upstream="slow"),
        lambda i: http(i, f"/delay/{rng.randint(1, 60)}", upstream="slow", required=True),
        lambda i: http(i, f"/status/{rng.choice([500, 503, 404])}", upstream="failing"),
        lambda i: http(i, "/reset", upstream="failing"),
        lambda i: http(i, "/hang", upstream="failing", timeout=_ms(rng.randint(20, 150))),
        lambda i: http(i, "/status/503", upstream="failing", fallback=_fallback()),
        lambda i: http(i, "/delay/300", upstream="narrow", timeout=_ms(100)),
        lambda i: http(i, f"/flap/{rng.randint(1, 80)}", upstream="flapping"),
        lambda i: http(i, f"/flap/{rng.randint(1, 30)}", upstream="flapping", required=True),
        lambda i: http(i, f"/delay/{rng.randint(1, 80)}", upstream="restarting"),
        lambda i: rpc_target(i, "Delay", str(rng.randint(1, 100)).encode()),
        lambda i: rpc_target(i, "Fail", rng.choice([b"14", b"5"])),
    ]
    targets = [rng.choice(menu)(f"t{n}") for n in range(rng.randint(1, 5))]
    if mode in ("expiring", "cancel"):
        targets.append(http("stuck", "/hang", upstream="sink"))
    if mode == "cancel":
        targets.append(http("first", "/delay/1", upstream="slow"))
    return targets


def _ms(milliseconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(nanos=milliseconds * 1_000_000)


def _fallback() -> struct_pb2.Value:
    return struct_pb2.Value(string_value="stale but fine")


def check_stream(
    tally: Tally,
    targets: list[pb.Target],
    ended: tuple[list[pb.TargetResult], grpc.StatusCode, str, dict[str, Any]],
    timing: tuple[float, float],
) -> None:
    """Records one finished call; notes every way its stream or trailers are broken."""
    results, code, details, trailers = ended
    tally.codes[code.name] += 1
    for result in results:
        tally.outcomes[pb.Outcome.Name(result.outcome)] += 1
    where = f"{code.name} {details[:120]!r} targets={[t.id for t in targets]}"
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        tally.problem(f"status {where}")
    deadline, elapsed = timing
    if not trailers and code == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed >= deadline:
        # The caller's own deadline fired first: the server's answer was on its way, late
        # because the machine is saturated (see DEADLINE_MISSES). Nothing to check.
        tally.deadline_misses += 1
        if len(tally.misses) < 20:
            tally.misses.append(
                f"deadline {deadline * 1000:.0f} ms, ended at {elapsed * 1000:.0f} ms with "
                f"{len(results)}/{len(targets)} results"
            )
        return
    missing = TRAILER_KEYS - set(trailers)
    if missing:
        tally.problem(f"trailers missing {sorted(missing)}: {where}")
        return
    ids = [result.id for result in results]
    if len(ids) != len(set(ids)) or not set(ids) <= {t.id for t in targets}:
        tally.problem(f"results {ids} do not match targets: {where}")
    if code != grpc.StatusCode.OK:
        return
    if sorted(ids) != sorted(t.id for t in targets):
        tally.problem(f"OK with results {ids}: {where}")
    failed = {r.id for r in results if r.outcome != pb.OUTCOME_OK}
    said_failed = set(filter(None, trailers["x-aggregate-failed"].split(",")))
    if said_failed != failed or trailers["x-aggregate-succeeded"] != str(len(ids) - len(failed)):
        tally.problem(f"trailers {trailers} disagree with the stream: {where}")


async def cancel_after_first(call: Any, tally: Tally) -> None:
    """Reads one result, then cancels. A call that ended on its own first (a required target
    failed, admission shed it) must still have ended cleanly."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.read()
    call.cancel()
    code = await call.code()
    if code == grpc.StatusCode.CANCELLED:
        tally.codes["CANCELLED (by the caller)"] += 1
        return
    trailers = dict(await call.trailing_metadata() or ())
    tally.codes[code.name] += 1
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) or TRAILER_KEYS - set(trailers):
        tally.problem(f"call ended {code.name} before its cancel: {await call.details()!r}")


async def one_call(stub: pb_grpc.AggregatorStub, rng: random.Random, tally: Tally) -> None:
    """One call of a random mode and batch; what it ended with goes into ``tally``."""
    mode = rng.choices(["normal", "expiring", "cancel", "collect"], weights=[60, 20, 15, 5])[0]
    targets = pick_targets(rng, mode)
    request = pb.AggregateRequest(targets=targets)
    tally.calls[mode] += 1
    loop = asyncio.get_running_loop()
    timeout = rng.uniform(0.5, 1.0) if mode == "expiring" else 3.0
    started = loop.time()
    if mode == "collect":
        unary = stub.Collect(request, timeout=timeout)
        try:
            results = list((await unary).results)
        except grpc.aio.AioRpcError:
            results = []
        trailers = dict(await unary.trailing_metadata() or ())
        ended = (results, await unary.code(), await unary.details(), trailers)
        check_stream(tally, targets, ended, (timeout, loop.time() - started))
        return
    call = stub.Aggregate(request, timeout=timeout)
    if mode == "cancel":
        await cancel_after_first(call, tally)
        return
    ended = await collect(call)
    check_stream(tally, targets, ended, (timeout, loop.time() - started))


async def client(stub: pb_grpc.AggregatorStub, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        shed = tally.codes["RESOURCE_EXHAUSTED"]
        await one_call(stub, rng, tally)
        # Pacing, not synchronisation; a shed caller backs off as a real one would.
        backoff = 0.1 if tally.codes["RESOURCE_EXHAUSTED"] > shed else 0.02
        await asyncio.sleep(rng.uniform(0, backoff))


async def load(port: int, seed: int, seconds: float, clients: int) -> Tally:
    """``clients`` concurrent callers for ``seconds``; what they saw."""
    tally = Tally()
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AggregatorStub(channel)
        until = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(
            *(client(stub, rng.randrange(2**32), until, tally) for _ in range(clients))
        )
    return tally


async def load_from_another_process(port: int, seed: int, seconds: float, clients: int) -> Tally:
    """Runs ``load`` in a child process (``python -m tests.e2e.test_soak``), so the callers do not
    share the aggregator's event loop: a loop shared with a dozen busy clients lags far more than
    the deadline margin, and callers would miss trailers for reasons no server could help."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.e2e.test_soak",
        str(port), str(seed), str(seconds), str(clients),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(seconds + 60):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, output[-2000:]
    return Tally.from_json(output.decode().splitlines()[-1])


# The soak ------------------------------------------------------------------------------------


def soak_config(app: FaultyUpstream, flapping: FaultyUpstream, restarting: FaultyUpstream,
                rpc_address: str) -> dict[str, Any]:  # fmt: skip
    """slow, failing, narrow and sink are four upstreams on one app, each with its own pool
    and policies; flapping and restarting have an app each."""
    retry = {"attempts": 3, "backoff": "5ms", "max_backoff": "40ms", "budget": 0.2}
    breaker = {"fail_max": 3, "reset_timeout": "250ms"}
    return {
        "server": {
            "address": "127.0.0.1:0",
            "metrics_address": "",
            "admin_address": "",
            "max_concurrent_calls": CLIENTS - 2,  # admission control sheds now and then too
            "deadline_margin": "100ms",
            "deadline_margin_ratio": 0.25,
            "shutdown_grace": "2s",
        },
        "upstreams": {
            "slow": {
                "kind": "http", "url": app.url, "timeout": "1s", "max_concurrency": 8,
                "retry": retry, "circuit_breaker": {"fail_max": 5, "reset_timeout": "250ms"},
            },
            "failing": {
                "kind": "http", "url": app.url, "timeout": "1s", "max_concurrency": 8,
                "retry": retry, "circuit_breaker": breaker,
            },
            "narrow": {"kind": "http", "url": app.url, "timeout": "1s", "max_concurrency": 1},
            "sink": {"kind": "http", "url": app.url, "timeout": "10s", "max_concurrency": 64},
            "flapping": {
                "kind": "http", "url": flapping.url, "timeout": "500ms", "max_concurrency": 16,
                "retry": retry, "circuit_breaker": breaker,
            },
            "restarting": {
                "kind": "http", "url": restarting.url, "timeout": "500ms",
                # Refused at once while it is down (loopback); 1 s so that a stalled loop
                # (a full collection in a long run) does not time a done connect out.
                "connect_timeout": "1s", "max_concurrency": 16, "retry": retry,
                "circuit_breaker": breaker,
            },
            "rpc": {
                "kind": "grpc", "address": rpc_address, "timeout": "1s", "max_concurrency": 16,
                "retry": {**retry, "grpc_codes": ["UNAVAILABLE"]}, "circuit_breaker": breaker,
            },
        },
    }  # fmt: skip


def warm_up_request() -> pb.AggregateRequest:
    """Every upstream called, every pool at its widest: whatever is made once and kept (grpc's
    channel and pollers, sessions, lazily built state) exists before the baseline."""
    widths = {"slow": 8, "failing": 8, "narrow": 1, "sink": 1, "restarting": 16}
    targets = [
        http(f"{name}{i}", "/delay/150", upstream=name)
        for name, width in widths.items()
        for i in range(width)
    ]
    targets += [http(f"flapping{i}", "/flap/150", upstream="flapping") for i in range(16)]
    targets += [rpc_target(f"rpc{i}", "Delay", b"150") for i in range(16)]
    return pb.AggregateRequest(targets=targets)


def healthy_request() -> pb.AggregateRequest:
    """A call to every upstream with a breaker, on a path that succeeds once healed."""
    return pb.AggregateRequest(
        targets=[
            http("slow", "/delay/1", upstream="slow"),
            http("failing", "/delay/1", upstream="failing"),
            http("flapping", "/flap/1", upstream="flapping"),
            http("restarting", "/delay/1", upstream="restarting"),
            rpc_target("rpc", "Delay", b"1"),
        ]
    )


def sample(server: AggregatorServer, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def finished_calls(server: AggregatorServer) -> Counter[str]:
    """Calls the server saw through to the end, by status (cancelled included)."""
    return Counter(
        {
            sample.labels["code"]: int(sample.value)
            for metric in server.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "aggregator_calls_total"
        }
    )


def describe_tasks(tasks: set[asyncio.Task[Any]]) -> list[str]:
    return sorted(f"{task.get_name()}: {task.get_coro()!r}"[:160] for task in tasks)


async def storm(server: AggregatorServer, flapping: FaultyUpstream,
                restarting: FaultyUpstream, rng: random.Random) -> Tally:  # fmt: skip
    """The load, while one upstream flaps and another restarts; both end up healthy."""
    stop = asyncio.Event()
    chaos = [
        asyncio.create_task(flapping_loop(flapping, random.Random(rng.random()), stop)),
        asyncio.create_task(restarting_loop(restarting, random.Random(rng.random()), stop)),
    ]
    try:
        return await load_from_another_process(
            server.port, rng.randrange(2**32), SOAK_SECONDS, CLIENTS
        )
    finally:
        stop.set()
        await asyncio.gather(*chaos)
        flapping.healthy = True


def assert_the_storm_was_real(server: AggregatorServer, tally: Tally) -> None:
    """Every promise kept, and every fault the soak claims to inject really happened."""
    assert tally.problems == [], "\n".join(tally.problems)
    allowed_misses = max(DEADLINE_MISSES * tally.calls["expiring"], 3)
    assert tally.deadline_misses <= allowed_misses, (tally.deadline_misses, tally.misses)
    assert tally.calls.total() > CLIENTS * SOAK_SECONDS, tally.calls
    assert min(tally.calls.values()) > 0, tally.calls
    for outcome in ("OK", "ERROR", "TIMEOUT", "UNAVAILABLE", "CIRCUIT_OPEN", "REJECTED"):
        assert tally.outcomes[f"OUTCOME_{outcome}"] > 0, tally.outcomes
    assert tally.codes["OK"] > tally.codes.total() // 3, tally.codes
    assert tally.codes["RESOURCE_EXHAUSTED"] > 0, tally.codes
    assert tally.codes["CANCELLED (by the caller)"] > 0, tally.codes
    for name in ("failing", "flapping", "restarting"):
        labels = {"upstream": name, "outcome": "circuit_open"}
        assert sample(server, "aggregator_targets_total", **labels) > 0, f"{name} never opened"


async def breakers_close(
    server: AggregatorServer, stub: pb_grpc.AggregatorStub
) -> dict[str, float]:
    """Calls every healed upstream (a breaker only tries again when called) until every
    breaker is closed or 15 s pass; returns the breakers' states."""

    def states() -> dict[str, float]:
        return {
            name: sample(server, "aggregator_circuit_state", upstream=name) for name in BREAKERS
        }

    loop = asyncio.get_running_loop()
    give_up = loop.time() + 15
    while any(states().values()) and loop.time() < give_up:
        await collect(stub.Aggregate(healthy_request(), timeout=3))
        await asyncio.sleep(0.05)  # pacing: the breakers' reset_timeout is 250 ms
    return states()


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 120)
async def test_soak_loses_nothing_and_breakers_recover(caplog):
    caplog.set_level(logging.ERROR, logger="aggregator")
    caplog.set_level(logging.CRITICAL, logger="aiohttp")
    rng = random.Random(20240601)
    app, flapping, restarting = FaultyUpstream(), FaultyUpstream(), FaultyUpstream()
    async with contextlib.AsyncExitStack() as stack:
        for upstream in (app, flapping, restarting):
            await upstream.start()
            stack.push_async_callback(upstream.stop)
        rpc_address = await stack.enter_async_context(grpc_upstream())
        config = config_from_mapping(soak_config(app, flapping, restarting, rpc_address))
        server = AggregatorServer(config)
        await server.start()
        stack.push_async_callback(server.drain)
        address = f"127.0.0.1:{server.port}"
        stub = pb_grpc.AggregatorStub(
            await stack.enter_async_context(grpc.aio.insecure_channel(address))
        )
        for _ in range(2):  # warm-up: every pool at its widest, then the baseline
            results, code, _, _ = await collect(stub.Aggregate(warm_up_request(), timeout=5))
            assert code == grpc.StatusCode.OK
            failed = [(r.id, r.error) for r in results if r.outcome != pb.OUTCOME_OK]
            assert failed == [], failed
        rest_upstreams = (app, flapping, restarting)
        assert await settle(lambda: not any(u.connections for u in rest_upstreams))
        baseline_tasks, baseline_fds, baseline_rss = set(asyncio.all_tasks()), open_fds(), rss_mb()
        finished_before = finished_calls(server)

        tally = await storm(server, flapping, restarting, rng)

        assert_the_storm_was_real(server, tally)
        assert await settle(lambda: sample(server, "aggregator_inflight_calls") == 0), repr(server)
        finished = finished_calls(server) - finished_before
        assert finished.total() == tally.calls.total(), (finished, tally.codes)
        states = await breakers_close(server, stub)
        assert not any(states.values()), f"breakers not closed 15 s after healing: {states}"
        results, code, _, trailers = await collect(stub.Aggregate(healthy_request(), timeout=3))
        assert code == grpc.StatusCode.OK
        assert [pb.Outcome.Name(r.outcome) for r in results] == ["OUTCOME_OK"] * 5, results
        assert trailers["x-aggregate-completed"] == "true"

        # Nothing left behind: connections, tasks, file descriptors, memory, unexpected errors.
        idle = await settle(lambda: not any(u.connections for u in rest_upstreams))
        assert idle, [u.connections for u in rest_upstreams]
        tasks_back = await settle(
            lambda: len(asyncio.all_tasks()) <= len(baseline_tasks) + TASK_SLACK
        )
        extra = set(asyncio.all_tasks()) - baseline_tasks
        assert tasks_back, "tasks left behind:\n" + "\n".join(describe_tasks(extra))
        fds_back = await settle(lambda: open_fds() <= baseline_fds + FD_SLACK)
        assert fds_back, f"{open_fds()} fds open, {baseline_fds} after warm-up"
        growth = rss_mb() - baseline_rss
        assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.0f} MB over {tally.calls.total()} calls"
        errors = [r.getMessage() for r in caplog.records if r.name.startswith("aggregator")]
        assert errors == [], errors
        print(
            f"soak {SOAK_SECONDS:g}s: calls {dict(tally.calls)}, codes {dict(tally.codes)}, "
            f"{tally.deadline_misses} callers' deadlines fired first, "
            f"outcomes {dict(tally.outcomes)}; tasks {len(baseline_tasks)} -> "
            f"{len(asyncio.all_tasks())}, fds {baseline_fds} -> {open_fds()}, "
            f"RSS +{growth:.1f} MB"
        )


# SIGTERM under load --------------------------------------------------------------------------

IN_FLIGHT = 16
TARGETS_PER_CALL = 3


@pytest.fixture
async def serve_process(tmp_path, rest) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """`aggregator serve` in a child process, ready when its health says SERVING."""
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
server:
  address: "127.0.0.1:{port}"
  metrics_address: ""
  admin_address: ""
  shutdown_grace: 10s
upstreams:
  rest: {{kind: http, url: "{rest.url}", timeout: 5s}}
"""
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aggregator", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            response = await health.Check(
                health_pb2.HealthCheckRequest(), timeout=20, wait_for_ready=True
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        yield process, port
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_under_load_drains_every_call_in_flight(serve_process, rest: RestUpstream):
    process, port = serve_process
    rng = random.Random(7)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.AggregatorStub(channel)
        calls = [
            stub.Aggregate(
                pb.AggregateRequest(
                    targets=[
                        http(f"t{n}", f"/delay/{rng.randint(300, 900)}")
                        for n in range(TARGETS_PER_CALL)
                    ]
                ),
                timeout=20,
            )
            for _ in range(IN_FLIGHT)
        ]
        readers = [asyncio.create_task(collect(call)) for call in calls]
        for _ in range(IN_FLIGHT * TARGETS_PER_CALL):  # every target has reached the upstream
            await wait_for(rest.recorder.arrived, timeout=10)

        process.send_signal(signal.SIGTERM)

        outcomes = await asyncio.gather(*readers)
    for results, code, details, trailers in outcomes:
        assert code == grpc.StatusCode.OK, details
        assert sorted(r.id for r in results) == ["t0", "t1", "t2"]
        assert all(r.outcome == pb.OUTCOME_OK for r in results), results
        assert trailers["x-aggregate-completed"] == "true"
    async with asyncio.timeout(15):
        assert await process.wait() == 0
        output = (await process.stdout.read()).decode()  # type: ignore[union-attr]
    assert "Traceback" not in output, output
    assert len(rest.recorder.requests) == IN_FLIGHT * TARGETS_PER_CALL


# The chaos soak (bench/soak.py, `make soak`), short ------------------------------------------

# Its length in seconds, SIGTERM included; the test takes some 6 s more (starting, draining).
# Shorten it on a busy machine; make test keeps it at most 45 s.
CHAOS_SECONDS = float(os.environ.get("AGGREGATOR_CHAOS_SECONDS", "30"))


async def test_chaos_soak_under_uvloop_answers_everything_and_leaks_nothing(tmp_path):
    """`make soak`, short: REST upstream killed and restarted, gRPC upstream stopped and
    continued, c32 of 5-target aggregates with a 2 s deadline, then SIGTERM under load. Every
    status from the chaos is OK/UNAVAILABLE/DEADLINE_EXCEEDED (RESOURCE_EXHAUSTED if refused),
    none CANCELLED on the drain, the fds the pools do not explain back within a few of the
    start, exit 0 within a second of the last call. Connections leaked by cancelled connects
    under uvloop held the exit 2 s (the pool's close waiting for them); calls still arriving
    when grpc stopped got CANCELLED (30 in 40 s)."""
    settings = soak.Settings(
        seconds=CHAOS_SECONDS,
        concurrency=32,
        event_loop="uvloop",
        kill_every=CHAOS_SECONDS / 4,
        stop_every=CHAOS_SECONDS / 2,
        warmup=3.0,
        quiet=5.0,
    )
    result = await soak.run(settings, tmp_path)
    assert soak.verdict(result) == [], soak.summary(result)
    chaos = {what for what, _, _ in result["chaos_windows"]}
    assert chaos == {"rest_b killed", "rpc stopped"}, soak.summary(result)
    assert result["drain_statuses"], "the load was still running at SIGTERM"


if __name__ == "__main__":  # the load generator, run by load_from_another_process
    port, seed, seconds, clients = sys.argv[1:]
    tally = asyncio.run(load(int(port), int(seed), float(seconds), int(clients)))
    print(tally.to_json())
