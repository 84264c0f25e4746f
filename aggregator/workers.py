"""``server.workers`` > 1: processes sharing the port, as grpc's multiprocessing example does.

The parent forks every worker before any gRPC object exists; each worker runs its own event
loop and its own server bound with SO_REUSEPORT, so the kernel spreads connections over them.
Limits, breakers and caches are per worker. Metrics are aggregated across workers with
prometheus-client's multi-process mode: the parent points PROMETHEUS_MULTIPROC_DIR at a
fresh folder before anything imports prometheus_client, and any worker's /metrics (they share
that port too) reports the sum.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile

from aggregator.admin.group import WORKER, WORKERS_DIR
from aggregator.config import Config
from aggregator.reload import ConfigFile

log = logging.getLogger("aggregator")


def run_workers(config: Config, source: ConfigFile | None = None) -> int:
    """Runs ``server.workers`` worker processes until SIGTERM/SIGINT; returns the exit code.
    Each worker reloads ``source`` on its own when the file changes; SIGHUP is forwarded."""
    if "prometheus_client" in sys.modules and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        raise RuntimeError("prometheus_client was imported before the workers were set up")
    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="aggregator-metrics-")
    )
    # The group's private folder: each worker's admin JSON on a unix socket, for the worker
    # answering the admin page to merge (aggregator/admin/group.py). 0700: this user only.
    own_group_dir = WORKERS_DIR not in os.environ
    group_dir = os.environ.setdefault(WORKERS_DIR, tempfile.mkdtemp(prefix="aggregator-workers-"))
    children = [_fork_worker(config, index, source) for index in range(config.server.workers)]
    log.info("started %d workers: %s", len(children), " ".join(map(str, children)))

    def forward(signum: int, frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    code = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        code = code or os.waitstatus_to_exitcode(status)
        if "prometheus_client" in sys.modules:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    if own_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if own_group_dir:
        shutil.rmtree(group_dir, ignore_errors=True)
    return code


def _fork_worker(config: Config, index: int, source: ConfigFile | None) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    os.environ[WORKER] = str(index)
    try:
        from aggregator.lifecycle import run

        run(config, source)
        code = 0
    except BaseException:
        log.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)
