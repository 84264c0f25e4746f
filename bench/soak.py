"""The chaos soak (docs/operations.md, "Chaos soak"): real processes on loopback, load running,
upstreams failing under it, then SIGTERM under load.

- two REST upstreams (bench/upstreams.py's DelayProtocol), each a process of its own: ``rest_a``
  stays up, ``rest_b`` is SIGKILLed every ``kill_every`` seconds and restarted on its port 2-3 s
  later;
- a gRPC upstream (bench/upstreams.py's server), SIGSTOPped for 3 s every ``stop_every`` seconds;
- ``aggregator serve`` on the event loop asked for, with a 2 s connect timeout budget;
- ``concurrency`` callers on one channel, each calling 5-target aggregates with a 2 s deadline in
  a loop (the ``rest_b`` target is required: when it fails its siblings are cancelled, which is
  how connects get cancelled mid-way);
- the last ``quiet`` seconds have no chaos, so the last samples are comparable with the first;
- then SIGTERM while the callers keep calling, until the process exits.

Reported: aggregates, statuses by cause (the chaos window a call overlapped, or the drain),
target outcomes, RSS, open fds and pooled connections sampled every second with their slope over
the second half, the drain's statuses, and how long after SIGTERM and after the last call in
flight the process exited. ``python -m bench.soak --seconds 120`` (``make soak``); the short
version runs in tests/e2e/test_soak.py. Every address is on loopback; every loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from bench.procs import run_loop
from bench.scenarios import DELAY_METHOD

_ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 2.0  # each aggregate's
DOWN = (2.0, 3.0)  # a killed REST upstream is restarted after this long (seconds, at random)
STOPPED = 3.0  # a stopped gRPC upstream is continued after this long
ANSWERED = {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}  # from the chaos


@dataclass
class Settings:
    seconds: float = 120.0
    concurrency: int = 32
    event_loop: str = "uvloop"
    kill_every: float = 20.0
    stop_every: float = 30.0
    warmup: float = 5.0  # load without chaos at the start: the baseline samples
    quiet: float = 8.0  # and at the end: the samples compared with them
    seed: int = 25


@dataclass
class Call:
    started: float
    ended: float
    code: str
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class Sample:
    at: float
    rss_mb: float
    fds: int
    connections: float  # aggregator_upstream_connections, all upstreams and states
    busy: float  # of which busy


# Child processes -----------------------------------------------------------------------------


async def _serve_rest(port: int) -> None:
    loop = asyncio.get_running_loop()
    from bench.upstreams import DelayProtocol

    server = await loop.create_server(
        functools.partial(DelayProtocol, random.Random(port)), "127.0.0.1", port, backlog=1024
    )
    await _until_terminated()
    server.close()


async def _serve_grpc(port: int) -> None:
    from bench.upstreams import grpc_server

    server = grpc_server()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await _until_terminated()
    await server.stop(None)


async def _until_terminated() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def _spawn(*argv: str, log: Path | None = None) -> asyncio.subprocess.Process:
    # A local file, opened once per child: the child has its own copy of the descriptor.
    with open(log or os.devnull, "ab") as out:  # noqa: ASYNC230
        return await asyncio.create_subprocess_exec(
            *argv, stdout=out, stderr=asyncio.subprocess.STDOUT, cwd=_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip


async def _upstream(kind: str, port: int) -> asyncio.subprocess.Process:
    process = await _spawn(sys.executable, "-m", "bench.soak", "--serve", kind, str(port))
    await _listening(port)
    return process


async def _listening(port: int, seconds: float = 20.0) -> None:
    """Waits until something accepts connections on ``port`` (a child starting)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > until:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
            process.terminate()
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Measurements --------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _connections(metrics_port: int) -> tuple[float, float]:
    """Pooled connections, all and busy, from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as page:
        text = page.read().decode()
    total = busy = 0.0
    for line in text.splitlines():
        if line.startswith("aggregator_upstream_connections{"):
            value = float(line.rsplit(" ", 1)[1])
            total += value
            busy += value if 'state="busy"' in line else 0.0
    return total, busy


async def _sampler(pid: int, metrics_port: int, samples: list[Sample], started: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            rss = _rss_mb(pid)
            connections, busy = await loop.run_in_executor(None, _connections, metrics_port)
        except OSError:  # the process is gone, or its metrics closed: the drain
            return
        samples.append(
            Sample(round(time.monotonic() - started, 2), round(rss, 1), fds, connections, busy)
        )
        await asyncio.sleep(1.0)


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per minute."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if not spread:
        return 0.0
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


# Load ----------------------------------------------------------------------------------------


def _request() -> pb.AggregateRequest:
    def rest(target_id: str, upstream: str, ms: int, required: bool = False) -> pb.Target:
        return pb.Target(
            id=target_id,
            http=pb.HttpCall(upstream=upstream, method="GET", path=f"/delay/{ms}"),
            required=required,
        )

    return pb.AggregateRequest(
        targets=[
            rest("a1", "rest_a", 10),
            rest("a2", "rest_a", 30),
            rest("b1", "rest_b", 10, required=True),
            rest("b2", "rest_b", 20),
            pb.Target(
                id="r1", grpc=pb.GrpcCall(upstream="rpc", method=DELAY_METHOD, request=b"10")
            ),
        ]
    )


async def _caller(stub: pb_grpc.AggregatorStub, calls: list[Call], until: asyncio.Event) -> None:
    """Calls until, after ``until`` (SIGTERM), a call is refused UNAVAILABLE."""
    request = _request()
    while True:
        started = time.monotonic()
        call = stub.Aggregate(request, timeout=DEADLINE)
        outcomes: Counter[str] = Counter()
        try:
            async for result in call:
                outcomes[pb.Outcome.Name(result.outcome)] += 1
        except grpc.aio.AioRpcError:
            pass
        code = (await call.code()).name
        calls.append(Call(started, time.monotonic(), code, outcomes))
        if code == "UNAVAILABLE" and until.is_set():
            return


# The run -------------------------------------------------------------------------------------


@dataclass
class Chaos:
    windows: list[tuple[str, float, float]] = field(default_factory=list)  # what, from, to

    def cause(self, call: Call, sigterm: float) -> str:
        if call.ended >= sigterm:
            return "drain"
        for what, start, end in self.windows:
            # a call that overlapped the window, or started within a deadline after it (a
            # breaker or a reconnect may still be catching up)
            if call.started <= end + DEADLINE and call.ended >= start:
                return what
        return "steady"


async def _chaos(
    settings: Settings, rest_b: list[asyncio.subprocess.Process], rest_b_port: int,
    rpc: asyncio.subprocess.Process, chaos: Chaos, started: float,
) -> None:  # fmt: skip
    """Kills and restarts rest_b, stops and continues rpc, from warmup to seconds - quiet."""
    rng = random.Random(settings.seed)
    end = started + settings.seconds - settings.quiet
    next_kill = started + settings.warmup
    next_stop = started + settings.warmup + settings.kill_every / 2
    while True:
        now = time.monotonic()
        upcoming = min(next_kill, next_stop)
        if upcoming + max(DOWN[1], STOPPED) > end:
            return
        await asyncio.sleep(max(0.0, upcoming - now))
        if next_kill <= next_stop:
            rest_b[0].kill()
            await rest_b[0].wait()
            down_at = time.monotonic()
            await asyncio.sleep(rng.uniform(*DOWN))
            rest_b[0] = await _upstream("rest", rest_b_port)
            chaos.windows.append(("rest_b killed", down_at, time.monotonic()))
            next_kill += settings.kill_every
        else:
            rpc.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            await asyncio.sleep(STOPPED)
            rpc.send_signal(signal.SIGCONT)
            chaos.windows.append(("rpc stopped", stopped_at, time.monotonic()))
            next_stop += settings.stop_every


def _config(port: int, metrics_port: int, ports: dict[str, int], event_loop: str) -> str:
    return f"""
server:
  address: "127.0.0.1:{port}"
  metrics_address: "127.0.0.1:{metrics_port}"
  admin_address: ""
  event_loop: {event_loop}
  shutdown_grace: 5s
  log_level: warning
upstreams:
  rest_a: {{kind: http, url: "http://127.0.0.1:{ports["rest_a"]}", timeout: 2s}}
  rest_b: {{kind: http, url: "http://127.0.0.1:{ports["rest_b"]}", timeout: 2s}}
  rpc: {{kind: grpc, address: "127.0.0.1:{ports["rpc"]}", timeout: 2s}}
"""


@contextlib.asynccontextmanager
async def _processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Every child, stopped on the way out whatever happened (rest_b's latest is its first)."""
    children: list[asyncio.subprocess.Process] = []
    try:
        yield children
    finally:
        await asyncio.gather(*(_stop(child) for child in children))


async def _serving(port: int, seconds: float = 30.0) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = await health.Check(
            health_pb2.HealthCheckRequest(), timeout=seconds, wait_for_ready=True
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def run(settings: Settings, directory: Path) -> dict[str, Any]:
    """One soak; its report (see report())."""
    ports = {"rest_a": free_port(), "rest_b": free_port(), "rpc": free_port()}
    port, metrics_port = free_port(), free_port()
    config = directory / "config.yaml"
    config.write_text(_config(port, metrics_port, ports, settings.event_loop))
    log = directory / "aggregator.log"
    async with _processes() as children:
        rest_b = children  # children[0]: the chaos replaces it with each restart
        children.append(await _upstream("rest", ports["rest_b"]))
        children.append(await _upstream("rest", ports["rest_a"]))
        rpc = await _upstream("grpc", ports["rpc"])
        children.append(rpc)
        argv = (sys.executable, "-m", "aggregator", "serve", "--config", str(config))
        server = await _spawn(*argv, log=log)
        children.append(server)
        await _serving(port)
        calls: list[Call] = []
        samples: list[Sample] = []
        chaos = Chaos()
        until = asyncio.Event()
        started = time.monotonic()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AggregatorStub(channel)  # type: ignore[no-untyped-call]
            load = [
                asyncio.create_task(_caller(stub, calls, until))
                for _ in range(settings.concurrency)
            ]
            sampler = asyncio.create_task(_sampler(server.pid, metrics_port, samples, started))
            try:
                await _chaos(settings, rest_b, ports["rest_b"], rpc, chaos, started)
                await asyncio.sleep(max(0.0, started + settings.seconds - time.monotonic()))
                sigterm = time.monotonic()
                server.send_signal(signal.SIGTERM)
                until.set()  # each caller goes elsewhere once refused, as a balancer would
                async with asyncio.timeout(30):
                    exit_code = await server.wait()
                exited = time.monotonic()
                async with asyncio.timeout(DEADLINE + 5):
                    await asyncio.gather(*load)
            finally:
                until.set()
                for task in (*load, sampler):
                    task.cancel()
                await asyncio.gather(*load, sampler, return_exceptions=True)
    errors = [
        line for line in log.read_text().splitlines() if "ERROR" in line or "Traceback" in line
    ]
    return report(settings, calls, samples, chaos, sigterm, exited, exit_code, started, errors)


def report(
    settings: Settings, calls: list[Call], samples: list[Sample], chaos: Chaos,
    sigterm: float, exited: float, exit_code: int, started: float, errors: list[str],
) -> dict[str, Any]:  # fmt: skip
    by_cause: dict[str, Counter[str]] = {}
    outcomes: Counter[str] = Counter()
    for call in calls:
        by_cause.setdefault(chaos.cause(call, sigterm), Counter())[call.code] += 1
        outcomes.update(call.outcomes)
    in_flight = [call for call in calls if call.started < sigterm]
    last_call = max((call.ended for call in in_flight), default=sigterm)
    before = [s for s in samples if s.at <= sigterm - started]
    half = [s for s in before if s.at >= (sigterm - started) / 2]
    last = before[-1] if before else None
    return {
        "settings": asdict(settings),
        "aggregates": len(calls),
        "statuses_by_cause": {cause: dict(codes) for cause, codes in sorted(by_cause.items())},
        "target_outcomes": dict(outcomes),
        "chaos_windows": [
            (what, round(a - started, 1), round(b - started, 1)) for what, a, b in chaos.windows
        ],
        "drain_statuses": dict(by_cause.get("drain", Counter())),
        "exit_code": exit_code,
        "exit_after_sigterm_s": round(exited - sigterm, 3),
        "exit_after_last_call_s": round(exited - last_call, 3),
        "rss_mb": _trend([(s.at, s.rss_mb) for s in before], [(s.at, s.rss_mb) for s in half]),
        "fds": _trend([(s.at, s.fds) for s in before], [(s.at, s.fds) for s in half]),
        # what the pools do not explain: a leaked socket, file or pipe shows here
        "other_fds": _trend(
            [(s.at, s.fds - s.connections) for s in before],
            [(s.at, s.fds - s.connections) for s in half],
        ),
        "busy_connections_end": last.busy if last else None,
        "connections": _trend(
            [(s.at, s.connections) for s in before], [(s.at, s.connections) for s in half]
        ),
        "errors_logged": errors[:20],
        "samples": [asdict(s) for s in samples],
    }  # fmt: skip


def _trend(
    points: list[tuple[float, float]], second_half: list[tuple[float, float]]
) -> dict[str, float]:
    values = [v for _, v in points] or [0.0]
    return {
        "start": values[0],
        "max": max(values),
        "end": values[-1],
        "slope_per_min_second_half": round(slope_per_minute(second_half), 2),
    }


def summary(result: dict[str, Any]) -> str:
    lines = [f"aggregates: {result['aggregates']}"]
    for cause, codes in result["statuses_by_cause"].items():
        lines.append(f"  {cause}: {codes}")
    lines.append(f"target outcomes: {result['target_outcomes']}")
    lines.append(f"chaos: {result['chaos_windows']}")
    for what in ("rss_mb", "fds", "connections", "other_fds"):
        lines.append(f"{what}: {result[what]}")
    lines.append(f"drain statuses: {result['drain_statuses']}")
    lines.append(
        f"exit {result['exit_code']} {result['exit_after_sigterm_s']} s after SIGTERM, "
        f"{result['exit_after_last_call_s']} s after the last call in flight"
    )
    if result["errors_logged"]:
        lines.append("ERROR lines: " + " | ".join(result["errors_logged"][:3]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=Settings.seconds)
    parser.add_argument("--concurrency", type=int, default=Settings.concurrency)
    parser.add_argument("--event-loop", choices=("uvloop", "asyncio"), default=Settings.event_loop)
    parser.add_argument("--kill-every", type=float, default=Settings.kill_every)
    parser.add_argument("--stop-every", type=float, default=Settings.stop_every)
    parser.add_argument("--json", type=Path, help="write the whole report here")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        kind, port = args.serve
        run_loop(_serve_rest(int(port)) if kind == "rest" else _serve_grpc(int(port)))
        return 0
    settings = Settings(
        seconds=args.seconds, concurrency=args.concurrency, event_loop=args.event_loop,
        kill_every=args.kill_every, stop_every=args.stop_every,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="soak-") as directory:
        result = asyncio.run(run(settings, Path(directory)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(summary(result))
    return 0 if verdict(result) == [] else 1


def verdict(result: dict[str, Any]) -> list[str]:
    """What the soak promises that did not hold (empty: all held)."""
    problems = []
    for cause, codes in result["statuses_by_cause"].items():
        unexpected = set(codes) - ANSWERED
        if unexpected:
            problems.append(f"{cause}: {sorted(unexpected)}")
    if "CANCELLED" in result["drain_statuses"]:
        problems.append(f"the drain cancelled calls: {result['drain_statuses']}")
    if result["exit_code"] != 0:
        problems.append(f"exit code {result['exit_code']}")
    if result["exit_after_last_call_s"] > 1.0:
        problems.append(f"exited {result['exit_after_last_call_s']} s after the last call")
    other = result["other_fds"]
    if other["end"] - other["start"] > FD_SLACK:
        problems.append(f"open fds other than pooled connections went {other}")
    if result["errors_logged"]:
        problems.append(f"{len(result['errors_logged'])} ERROR lines")
    return problems


FD_SLACK = 8  # fds (pools aside) the end may hold over the start: sockets on their way out


if __name__ == "__main__":
    sys.exit(main())
