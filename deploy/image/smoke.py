"""`make image-smoke`: builds the image (deploy/image/build.py), checks what it holds, runs it
with a test config and asks it what a client and an orchestrator would (docs/operations.md,
"Image").

1. the image runs as uid 10001 and has no pip, no way to bootstrap one, and no compiler;
2. it starts on a free loopback port, read-only root filesystem, every capability dropped;
3. grpc.health.v1 answers SERVING, an Aggregate against a small REST upstream on the host
   (served here) succeeds, and /metrics counts the call;
4. `podman stop` while a call is in flight: health turns NOT_SERVING, the call still finishes
   OK (the upstream answers only once NOT_SERVING was seen), and the process exits 0.

The container shares the host's network, so it reaches the upstream on 127.0.0.1 and its own
ports are loopback ports of the host. Runs with the project's virtualenv (grpcio, aiohttp).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import build  # this directory's build.py

from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
START_TIMEOUT = 60.0
CONFIG = """\
server:
  address: "127.0.0.1:{grpc}"
  metrics_address: "127.0.0.1:{metrics}"
  admin_address: ""
  shutdown_grace: 20s
upstreams:
  web: {{kind: http, url: "http://127.0.0.1:{upstream}", timeout: 30s}}
"""


def say(message: str) -> None:
    print(f"image-smoke: {message}", flush=True)


def free_port() -> int:
    """A port free now on the host's loopback (the container binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Upstream:
    """/ok answers at once; /hold answers once ``release`` is set, after setting ``held``."""

    def __init__(self) -> None:
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def ok(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def hold(self, _: web.Request) -> web.Response:
        self.held.set()
        await self.release.wait()
        return web.json_response({"held": True})


def listen() -> socket.socket:
    """The upstream's listening socket, bound before the config naming its port is written."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


@asynccontextmanager
async def serve_upstream(upstream: Upstream, sock: socket.socket) -> AsyncIterator[None]:
    app = web.Application()
    app.router.add_get("/ok", upstream.ok)
    app.router.add_get("/hold", upstream.hold)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def engine(host: build.Host, *argv: str) -> tuple[int, str]:
    """Runs ``podman ARGV`` (or docker) off the loop: exit code and stdout plus stderr."""
    process = await asyncio.create_subprocess_exec(
        host.engine, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    return await process.wait(), output.decode(errors="replace")


def check_contents(host: build.Host, tag: str) -> None:
    """Non-root, and neither pip, nor a venv that would bootstrap one, nor a compiler."""
    user = build.quiet([host.engine, "image", "inspect", "--format", "{{.Config.User}}", tag])
    assert user.stdout.strip() == "10001:10001", f"image user is {user.stdout.strip()!r}"
    script = (
        "! python -m pip --version && ! test -e /opt/aggregator/bin/pip"
        " && ! python3 -m venv /tmp/probe && ! command -v cc && ! command -v gcc"
        ' && test "$(id -u)" = 10001'
    )
    argv = [host.engine, "run", "--rm", "--network", "none", "--read-only", *host.run]
    result = build.quiet([*argv, "--entrypoint", "sh", tag, "-c", f"({script}) >/dev/null 2>&1"])
    assert result.returncode == 0, "the runtime image holds pip or a compiler, or runs as root"
    say("image runs as 10001:10001; no pip, no ensurepip wheels, no compiler")


async def wait_serving(stub: health_pb2_grpc.HealthStub, host: build.Host, name: str) -> float:
    started = time.monotonic()
    request = health_pb2.HealthCheckRequest(service="aggregator.v1.Aggregator")
    deadline = started + START_TIMEOUT
    while True:
        try:
            answer = await stub.Check(request, timeout=2, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            _, state = await engine(host, "inspect", "--format", "{{.State.Running}}", name)
            if time.monotonic() > deadline or state.strip() != "true":
                _, logs = await engine(host, "logs", name)
                raise SystemExit(
                    f"image-smoke: no health answer ({exc.code().name}):\n{logs}"
                ) from None
            continue  # not listening yet: Check waited up to 2 s for the connection
        assert answer.status == SERVING, f"health says {answer.status}"
        return time.monotonic() - started


async def aggregate(stub: aggregator_pb2_grpc.AggregatorStub, path: str) -> pb.TargetResult:
    target = pb.Target(id="page", http=pb.HttpCall(upstream="web", path=path), required=True)
    request = pb.AggregateRequest(targets=[target])
    results: list[pb.TargetResult] = [r async for r in stub.Aggregate(request, timeout=30)]
    (result,) = results
    return result


async def metrics_count(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    return next(line for line in text.splitlines() if line.startswith("aggregator_calls_total{"))


async def stop_while_busy(
    host: build.Host, name: str, channel: grpc.aio.Channel, upstream: Upstream
) -> None:
    """podman stop with a call in flight: NOT_SERVING first, the call ends OK, exit 0."""
    stub = aggregator_pb2_grpc.AggregatorStub(channel)  # type: ignore[no-untyped-call]
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="aggregator.v1.Aggregator")
    )
    assert (await watch.read()).status == SERVING
    call = asyncio.create_task(aggregate(stub, "/hold"))
    await upstream.held.wait()
    started = time.monotonic()
    stop = asyncio.create_task(engine(host, "stop", "--time", "30", name))
    while (await watch.read()).status != NOT_SERVING:
        pass
    # A Watch stream is a call like any other: left open, it would hold the drain for the
    # whole shutdown_grace (grpc's server.stop waits for every open call).
    watch.cancel()
    upstream.release.set()  # only now: the call must outlive the start of the drain
    result = await call
    assert result.outcome == pb.OUTCOME_OK, f"in-flight call ended {result}"
    returncode, output = await stop
    assert returncode == 0, f"{host.engine} stop failed: {output}"
    stopped = time.monotonic() - started
    _, code = await engine(host, "inspect", "--format", "{{.State.ExitCode}}", name)
    _, logs = await engine(host, "logs", name)
    assert code.strip() == "0", f"exit code {code.strip()}:\n{logs}"
    assert "draining: 1 calls in flight" in logs, logs
    assert "stopped" in logs, logs
    say(f"stop: NOT_SERVING, the in-flight call finished OK, exit 0 after {stopped:.2f} s")


async def exercise(host: build.Host, name: str, ports: dict[str, int], sock: socket.socket) -> None:
    upstream = Upstream()
    async with (
        serve_upstream(upstream, sock),
        grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel,
    ):
        startup = await wait_serving(health_pb2_grpc.HealthStub(channel), host, name)
        say(f"health SERVING on 127.0.0.1:{ports['grpc']}, {startup:.2f} s after start")
        stub = aggregator_pb2_grpc.AggregatorStub(channel)  # type: ignore[no-untyped-call]
        result = await aggregate(stub, "/ok")
        assert result.outcome == pb.OUTCOME_OK, result
        assert result.http_status == 200, result
        say(f"Aggregate: target {result.id} OK, HTTP {result.http_status}")
        say(f"metrics: {await metrics_count(ports['metrics'])}")
        await stop_while_busy(host, name, channel, upstream)


def smoke(host: build.Host, tag: str) -> None:
    """Runs the image with a test config on free loopback ports, then exercises it."""
    sock = listen()
    ports = {"grpc": free_port(), "metrics": free_port(), "upstream": sock.getsockname()[1]}
    name = f"aggregator-smoke-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="aggregator-smoke-") as scratch:
        config = Path(scratch) / "config.yaml"
        config.write_text(CONFIG.format(**ports))
        os.chmod(scratch, 0o755)
        config.chmod(0o644)  # read by uid 10001 in the container
        argv = [host.engine, "run", "--detach", "--name", name, "--network", "host"]
        argv += ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
        argv += ["--volume", f"{config}:/etc/aggregator/config.yaml:ro", *host.run, tag]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        try:
            asyncio.run(exercise(host, name, ports, sock))
        finally:
            build.quiet([host.engine, "rm", "--force", name])
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--tag", default=os.environ.get("IMAGE", "localhost/aggregator:0.1.0"))
    parser.add_argument("--base", default=os.environ.get("PYTHON_IMAGE") or None)
    parser.add_argument("--cold", action="store_true", help="remake the base, use no cache")
    args = parser.parse_args()
    started = time.monotonic()
    host = build.build(args.tag, args.base, rebuild_base=args.cold, no_cache=args.cold)
    say(f"build ({'cold' if args.cold else 'warm'}): {time.monotonic() - started:.1f} s")
    check_contents(host, args.tag)
    smoke(host, args.tag)
    say("passed")


if __name__ == "__main__":
    main()
