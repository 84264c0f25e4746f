"""The processes of one run, started once and shared by every scenario.

Upstreams first (their ports go into every side's config), then the three server sides and the
load generator, in parallel. The aggregator runs as ``python -m aggregator serve --config``: the
production entry point with a production-like config (bench/scenarios.py). The multicore mode
(bench/multicore.py) starts more aggregators later, with ``server.workers`` set, on every CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml

from bench.procs import Child, ProcessFailed, cpu_plan, python_module
from bench.scenarios import FLOOR, SCENARIOS, SIDES, aggregator_config, naive_upstreams

_START_TIMEOUT = 30.0
VERSUS_SIDE = "before"  # --versus REV: the aggregator at REV


class Harness:
    def __init__(self, log_dir: Path, seed: int, profile: Path | None = None) -> None:
        self.log_dir = log_dir
        self._profile = profile
        self.pinning = cpu_plan()
        self._server_cpus = self.pinning.get("server_cpus")
        self._harness_cpus = self.pinning.get("harness_cpus")
        self._all_cpus = (self._server_cpus or []) + (self._harness_cpus or []) or None
        self._seed = seed
        self._children: list[Child] = []
        self.servers: dict[str, Child] = {}
        self.addresses: dict[str, str] = {}
        # A server side -> the side whose requests it is sent, when not its own (multicore's).
        self.request_sides: dict[str, str] = {}
        self._upstream_addresses: tuple[dict[str, str], str, str] = ({}, "", "")
        self.upstreams: Child | None = None
        self.load: Child | None = None
        self.exit_codes: dict[str, int | None] = {}
        self.peak_rss_resets = True  # False once the kernel refused to reset VmHWM

    def __repr__(self) -> str:
        return f"<Harness {self._children!r}>"

    def _spawn(
        self, name: str, argv: list[str], server: bool, every_cpu: bool = False, **kwargs: Any
    ) -> Child:
        cpus = self._all_cpus if every_cpu else self._server_cpus if server else self._harness_cpus
        child = Child(name, argv, self.log_dir, cpus, **kwargs)
        self._children.append(child)
        return child

    def start(self) -> None:
        if self._harness_cpus:
            os.sched_setaffinity(0, self._harness_cpus)  # the orchestrator is harness too
        self.upstreams = self._spawn(
            "upstreams", python_module("bench.upstreams", "--seed", str(self._seed)), server=False
        )
        ports = self.upstreams.read_line(_START_TIMEOUT)
        http_urls = {name: f"http://127.0.0.1:{port}" for name, port in ports["http_ports"].items()}
        grpc_address = f"127.0.0.1:{ports['grpc_port']}"
        redis_url = self._start_redis() if "limits-redis" in SCENARIOS else ""
        self._upstream_addresses = (http_urls, grpc_address, redis_url)
        self.servers["aggregator"] = self._start_aggregator("aggregator")
        peers = json.dumps(naive_upstreams(http_urls, grpc_address))
        peer_sides = (("naive", ()), ("sequential", ("--sequential",)), (FLOOR, ("--floor",)))
        for side, extra in peer_sides:
            argv = python_module("bench.naive", "--upstreams", peers, *extra)
            self.servers[side] = self._spawn(side, argv, server=True)
        self.load = self._spawn(
            "load", python_module("bench.load"), server=False, stdin=subprocess.PIPE
        )
        for side, _ in peer_sides:
            port = self.servers[side].read_line(_START_TIMEOUT)["port"]
            self.addresses[side] = f"127.0.0.1:{port}"
        for side in (*SIDES, FLOOR):
            self._wait_ready(side)
        if self._profile is not None:
            self._start_profiler(self._profile)

    def _start_profiler(self, output: Path) -> None:
        """py-spy on the aggregator for the whole run: collapsed stacks, ready for flamegraphs."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(py_spy).exists():
            raise ProcessFailed("--profile needs py-spy: .venv/bin/pip install py-spy")
        argv = [py_spy, "record", "--pid", str(self.servers["aggregator"].pid), "--nonblocking"]
        argv += ["--rate", "250", "--format", "raw", "--output", str(output)]
        # SIGINT makes py-spy write its output and exit.
        self._spawn("py-spy", argv, server=False, stdout_to_log=True, stop_signal=signal.SIGINT)

    def _start_redis(self) -> str:
        """A redis-server for limits.backend: redis (the limits-redis scenario), ready."""
        port = _free_port()
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        self._spawn("redis", [*argv, "--appendonly", "no"], server=False, stdout_to_log=True)
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                return f"redis://127.0.0.1:{port}/0"
            except OSError:
                if time.monotonic() > deadline:
                    raise ProcessFailed("redis-server did not start") from None
                time.sleep(0.05)

    def start_workers(self, workers: int) -> str:
        """An aggregator with ``server.workers: workers`` on every CPU, serving once each worker
        does; returns its side name (sent the aggregator's requests)."""
        name = f"aggregator-w{workers}"
        self.servers[name] = self._start_aggregator(name, workers)
        self.request_sides[name] = "aggregator"
        self._wait_serving(name, workers)
        self._wait_ready(name)
        self.servers[name].find_descendants()
        return name

    def start_versus(self, tree: Path) -> str:
        """The aggregator of another tree (``--versus REV``: its code, this config), pinned as
        ours and sent our requests; returns its side name."""
        name = VERSUS_SIDE
        self.servers[name] = self._start_aggregator(name, cwd=tree)
        self.request_sides[name] = "aggregator"
        self._wait_ready(name)
        return name

    def _start_aggregator(
        self, name: str, workers: int | None = None, cwd: Path | None = None
    ) -> Child:
        port, metrics_port = _free_port(), _free_port()
        http_urls, grpc_address, redis_url = self._upstream_addresses
        config = aggregator_config(http_urls, grpc_address, port, metrics_port, redis_url)
        if workers is not None:
            # Every worker binds the same ports (SO_REUSEPORT): a free one, not 0 for each.
            config["server"] |= {"workers": workers, "admin_address": f"127.0.0.1:{_free_port()}"}
        config_path = self.log_dir / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.addresses[name] = f"127.0.0.1:{port}"
        argv = python_module("aggregator", "serve", "--config", str(config_path))
        every_cpu = workers is not None
        where = {"cwd": cwd} if cwd is not None else {}
        return self._spawn(
            name, argv, server=True, every_cpu=every_cpu, stdout_to_log=True, **where
        )

    def _wait_serving(self, name: str, workers: int) -> None:
        """Until each worker has logged that it serves: a load channel that connected before
        a worker bound the port would stay with the others, and the load would not spread."""
        deadline = time.monotonic() + _START_TIMEOUT
        child = self.servers[name]
        while child.log_path.read_text(errors="replace").count("serving gRPC on") < workers:
            child.check_alive()
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{name}: not every worker serves\n{child.tail()}")
            time.sleep(0.05)

    def _wait_ready(self, side: str) -> None:
        assert self.load is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            self.servers[side].check_alive()
            answer = self.load.ask(
                {"op": "ready", "target": self.addresses[side], "timeout": 1.0}, _START_TIMEOUT
            )
            if answer["ready"]:
                return
        raise ProcessFailed(f"{side} did not start serving\n{self.servers[side].tail()}")

    def harness_cpu_seconds(self) -> dict[str, float]:
        """CPU time so far of the processes that make the load: upstreams, load generator, us."""
        seconds = {c.name: c.cpu_seconds() for c in (self.upstreams, self.load) if c is not None}
        times = os.times()
        seconds["orchestrator"] = times.user + times.system
        return seconds

    def run_slice(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One slice of load on the server side ``command["side"]``."""
        assert self.load is not None
        server = command["side"]
        self.servers[server].check_alive()
        target, side = self.addresses[server], self.request_sides.get(server, server)
        return self.load.ask({**command, "op": "run", "target": target, "side": side}, timeout)

    def describe(self) -> dict[str, Any]:
        return {
            **self.pinning,
            "processes": {c.name: {"pid": c.pid, "cpus": c.affinity()} for c in self._children},
        }

    def stop(self) -> None:
        # Load first (its channels close cleanly), then the servers, then their upstreams.
        for child in reversed(self._children):
            with suppress(OSError):
                self.exit_codes[child.name] = child.stop()


@contextmanager
def running_harness(log_dir: Path, seed: int, profile: Path | None = None) -> Iterator[Harness]:
    harness = Harness(log_dir, seed, profile)
    try:
        harness.start()
        yield harness
    finally:
        harness.stop()


def _free_port() -> int:
    # A small race (the port is free now, maybe not in a second) that a fixed port would not
    # avoid either; with workers: 1 the aggregator refuses to start on a clash, so it shows.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
