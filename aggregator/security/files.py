"""Values loaded from files and loaded again when the files change: certificate rotation.

Kubernetes updates a mounted Secret by swapping a symlink, cert-manager and Vault agents by
rewriting files; either way ``os.stat`` sees a new inode, size or mtime. A change is noticed
at the first use after it (checked at most every ``CHECK_INTERVAL`` seconds). A load that fails
(a rotation caught half-written: a new certificate beside the old key) keeps the last good
value and is tried again at the next check, so a rotation never takes the service down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("aggregator")

CHECK_INTERVAL = 1.0  # seconds; tests set it to 0

_Signature = tuple[tuple[int, int, int], ...]


def _signature(paths: Sequence[str]) -> _Signature:
    stats = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            stats.append((0, 0, 0))
            continue
        stats.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(stats)


class Watched(Generic[T]):
    """``load()``'s value, reloaded when any of ``paths`` changes.

    Thread-safe: grpc calls the server's certificate fetcher from its own threads.
    """

    def __init__(self, what: str, paths: Sequence[str], load: Callable[[], T]) -> None:
        self._what = what
        self._paths = tuple(paths)
        self._load = load
        self._lock = threading.Lock()
        self._signature = _signature(self._paths)
        self._value = load()  # at start a failure is the caller's to report
        self._checked = time.monotonic()
        self.generation = 1  # grows by one with each successful reload

    def __repr__(self) -> str:
        return f"<Watched {self._what} [generation {self.generation}, {len(self._paths)} files]>"

    def current(self) -> T:
        """The value, reloaded first if a file changed since the last check."""
        now = time.monotonic()
        if now - self._checked < CHECK_INTERVAL:
            return self._value
        with self._lock:
            self._checked = now
            signature = _signature(self._paths)
            if signature != self._signature:
                self._reload(signature)
            return self._value

    def _reload(self, signature: _Signature) -> None:
        try:
            value = self._load()
        except (OSError, ValueError) as exc:
            log.warning("%s changed on disk but cannot be loaded, keeping the last: %s",
                        self._what, exc, extra={"event": "reload_failed"})  # fmt: skip
            return
        self._value, self._signature = value, signature
        self.generation += 1
        log.info("reloaded %s (generation %d)", self._what, self.generation,
                 extra={"event": "reloaded"})  # fmt: skip
