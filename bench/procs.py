"""The benchmark's processes: started pinned to CPUs, measured through /proc, stopped by pid.

CPU time is the process's utime + stime from ``/proc/<pid>/stat`` (all threads, clock ticks),
summed over the process and the processes it started (``server.workers`` forks its workers, whose
CPU the parent's counters only get once they exit); peak RSS is ``VmHWM`` from
``/proc/<pid>/status`` (the process alone), reset per measurement by writing ``5`` to
``/proc/<pid>/clear_refs`` where the kernel allows it (Linux >= 4.0, same user).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Coroutine, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_ROOT = Path(__file__).resolve().parent.parent  # where `python -m bench.*` finds the package


class ProcessFailed(RuntimeError):
    pass


def cpu_plan() -> dict[str, Any]:
    """Which CPUs the server under test gets and which the harness gets, if pinning works."""
    try:
        available = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return {"applied": False, "reason": "os.sched_getaffinity is not available"}
    if len(available) < 2:
        return {"applied": False, "reason": f"only {len(available)} CPU available"}
    return {
        "applied": True,
        "server_cpus": available[:1],
        "harness_cpus": available[1:],
        "note": "each server side on server_cpus; upstreams, load generator and orchestrator "
        "on harness_cpus",
    }


class Child:
    """A process of the benchmark, started with its CPU affinity already set."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        cpus: Sequence[int] | None,
        stdin: int | None = subprocess.DEVNULL,
        stdout_to_log: bool = False,
        stop_signal: int = signal.SIGTERM,
        cwd: Path = _ROOT,
    ) -> None:
        """``cwd``: where ``python -m`` finds the packages (another tree's, for --versus)."""
        self.name = name
        self._stop_signal = stop_signal
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("w")
        affinity = set(cpus) if cpus else None
        self.popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=self._log if stdout_to_log else subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Affinity is set before exec, so every thread the process ever starts inherits it.
            preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None,
        )
        self.pid = self.popen.pid
        self.processes = [self.pid]  # and its descendants, once find_descendants ran

    def __repr__(self) -> str:
        state = "running" if self.popen.poll() is None else f"exited {self.popen.returncode}"
        return f"<Child {self.name} pid {self.pid} [{state}]>"

    def affinity(self) -> list[int] | None:
        try:
            return sorted(os.sched_getaffinity(self.pid))
        except (AttributeError, OSError):
            return None

    def read_line(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the process writes, or ProcessFailed with its log's tail."""
        stdout: IO[str] | None = self.popen.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            raise ProcessFailed(f"{self.name} gave no answer within {timeout:g}s\n{self.tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        stdin = self.popen.stdin
        assert stdin is not None
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        return self.read_line(timeout)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise ProcessFailed(f"{self.name} exited with {self.popen.returncode}\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"  {self.name}| {line}" for line in text)

    def cpu_seconds(self) -> float:
        """CPU time so far of the process and of the processes found under it."""
        return sum(self.cpu_seconds_by_process().values())

    def cpu_seconds_by_process(self) -> dict[int, float]:
        """pid -> CPU time so far, for the process and the descendants find_descendants saw."""
        seconds: dict[int, float] = {}
        for pid in self.processes:
            try:
                seconds[pid] = _cpu_seconds(pid)
            except OSError:
                continue  # a worker that exited: its parent's counters then hold its CPU
        return seconds

    def find_descendants(self) -> None:
        """Counts the processes under this one from now on (server.workers' forks, once they
        serve). A pass over /proc, as not every kernel lists a process's children: done once,
        not around every slice (~10 ms on this VM)."""
        parents = _parents()
        found, todo = [self.pid], [self.pid]
        while todo:
            parent = todo.pop()
            children = [pid for pid, ppid in parents.items() if ppid == parent]
            found += children
            todo += children
        self.processes = found

    def reset_peak_rss(self) -> bool:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def memory_mb(self, field: str = "VmHWM") -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self, timeout: float = 10.0) -> int | None:
        """EOF on stdin or the stop signal, then wait; SIGKILL only this pid if it will not go."""
        if self.popen.poll() is None:
            if self.popen.stdin is not None:
                self.popen.stdin.close()
            else:
                self.popen.send_signal(self._stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


def _cpu_seconds(pid: int) -> float:
    return sum(_stat(pid)[10:12]) / _TICK  # utime, stime


def _stat(pid: int) -> list[int]:
    """/proc/<pid>/stat's fields after the command name and the state: [0] is the parent's
    pid (field 4 in proc(5)), [10] and [11] utime and stime (14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return [int(field) for field in stat[stat.rindex(")") + 4 :].split()]


def _parents() -> dict[int, int]:
    """pid -> parent pid, of every process on the machine."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, ValueError):  # exited meanwhile
                parents[int(entry.name)] = _stat(int(entry.name))[0]
    return parents


def machine_busy_seconds() -> float:
    """User and system CPU time of every process on the machine (all CPUs), from /proc/stat.

    Interrupt time is left out: loopback traffic is ours but may be accounted there.
    """
    try:
        user, nice, system = Path("/proc/stat").read_text().split(maxsplit=4)[1:4]
    except (OSError, ValueError):
        return 0.0
    return (int(user) + int(nice) + int(system)) / _TICK


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Runs a harness process's ``main`` on the loop the server would pick (uvloop when
    installed): the load generator and the upstreams share one CPU, and the cheaper they are,
    the later they limit a measurement."""
    from aggregator.lifecycle import event_loop_factory

    with asyncio.Runner(loop_factory=event_loop_factory("auto")) as runner:
        runner.run(main)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
