"""The one way work leaves the event loop: a small bounded pool of threads, owned by the server.

Parsing and building JSON, encoding and decoding gRPC messages in their JSON mapping, copying a
large decoded body, building an upstream's descriptor pool: each is a piece of CPU work that
cannot yield. ``Offload.run`` does a piece on the loop when it is small (``OFF_LOOP_BYTES``, the
one threshold) and on a thread otherwise; ``Offload.thread`` always on a thread::

    offload = Offload()                           # the server makes one and closes it
    document = await offload.run(len(body), json.loads, body)

At most ``threads`` pieces run at once and at most ``max_waiting`` wait for a thread (on the
loop, not in the executor's unbounded queue); past that ``OffloadBusy`` refuses the piece at once.

Cancellation: a caller cancelled while it waits for a thread leaves nothing behind (its piece was
never submitted). A caller cancelled while its piece runs returns at once; the piece runs to its
end (a thread cannot be interrupted) and its thread is given back only then, so no other piece
queues behind it and the bound holds whatever the number of callers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

# Below this (bytes handled, weighed by what they cost: see ``run``) a piece runs on the loop:
# about 2 ms at most for json.loads, less than a thread hop costs once the loop is busy.
OFF_LOOP_BYTES = 32 * 1024
# Pieces waiting for a thread, all callers together: each holds only references it had anyway;
# the bound is for a flood of calls that a single thread could not serve in any useful time.
MAX_WAITING = 1024
T = TypeVar("T")


class OffloadBusy(Exception):
    """Too many pieces of work are already waiting for a thread."""

    def __init__(self) -> None:
        super().__init__(f"the server has {MAX_WAITING} pieces of work waiting for its threads")


class Offload:
    """The threads that take CPU-bound work off the event loop; one per server, closed with it."""

    def __init__(self, threads: int = 1, max_waiting: int = MAX_WAITING) -> None:
        # One thread: json.loads, Struct.update and json_format hold the GIL, so a second thread
        # works no faster and makes the loop wait longer for the GIL (measured: health checks
        # during four 1 MiB decodes waited up to 125-190 ms with two threads, 56-87 ms with one).
        self._threads = threads
        self._max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="offload")
        self._slots = asyncio.Semaphore(threads)
        self.waiting = 0

    def __repr__(self) -> str:
        return f"<Offload [{self.busy}/{self._threads} threads busy, {self.waiting} waiting]>"

    @property
    def busy(self) -> int:
        """Threads given work and not yet handed back."""
        return self._threads - self._slots._value

    async def run(self, size: int, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)``: on the loop when ``size`` is at most OFF_LOOP_BYTES, else on a
        thread. ``size`` is the bytes the work handles, weighed by its cost per byte against
        json.loads' (gRPC to JSON costs about 16 times as much)."""
        if size <= OFF_LOOP_BYTES:
            return work(*args)
        return await self.thread(work, *args)

    async def thread(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on a thread, whatever its size. Raises OffloadBusy."""
        if self.waiting >= self._max_waiting:
            raise OffloadBusy()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            done = self._executor.submit(work, *args)
        except BaseException:
            self._slots.release()
            raise
        loop = asyncio.get_running_loop()
        done.add_done_callback(lambda _: _call_soon(loop, self._slots.release))
        return await asyncio.wrap_future(done)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
        loop.call_soon_threadsafe(callback)
