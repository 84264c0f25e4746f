"""JSON bodies into ``google.protobuf.Value`` (``TargetResult.json``, ``CollectResponse.merged``).

``json.loads`` (C) and ``Struct.update`` / ``ListValue.extend`` build the Value at about half the
cost of ``json_format.Parse``, which walks the document in pure Python (measured on a 0.9 MB body:
90 ms against 165 ms, the depth check included). Bodies over ``OFF_LOOP_BYTES`` are decoded on a
small pool of threads, so the event loop keeps serving other callers while they are; and one call
decodes at most ``server.max_decoded_bytes`` of bodies, all targets together (SPEC §15: large
bodies are decoded off the loop or refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from google.protobuf import struct_pb2

# Below this a body is decoded on the loop: about 2 ms at most, less than a thread hop costs
# once the loop is busy.
OFF_LOOP_BYTES = 32 * 1024
# protobuf messages a JSON value may nest into, counted as the wire sees them (an object is 3:
# Value, Struct and the map entry; an array 2: Value, ListValue; a scalar 1). grpc's parser (upb)
# refuses a message nested over 100 deep: a deeper Value would be sent but never read by the
# caller, and CollectResponse holds the Value 3 levels down.
MAX_MESSAGE_DEPTH = 90
T = TypeVar("T")


class NotDecoded(Exception):
    """A body that was not decoded; ``sentence`` says why for the target's ``error``, or is empty
    when the body simply is not JSON (it then stays in ``body``, without ``json``: SPEC §2)."""

    def __init__(self, sentence: str = "") -> None:
        super().__init__(sentence)
        self.sentence = sentence


class JsonDecoder:
    """The threads that decode large bodies; one per server, closed with it."""

    def __init__(self, threads: int = 1) -> None:
        # One thread: json.loads and Struct.update hold the GIL, so a second thread decodes no
        # faster and makes the loop wait longer for the GIL (measured: health checks during four
        # 1 MiB decodes waited up to 125-190 ms with two threads, 56-87 ms with one).
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="json-decode")
        # Decodes waiting for a thread wait here, on the loop, rather than in the executor's
        # unbounded queue: a cancelled call leaves nothing queued behind it.
        self._slots = asyncio.Semaphore(threads)

    def __repr__(self) -> str:
        return f"<JsonDecoder [{self.busy}/{self._threads} threads busy]>"

    @property
    def busy(self) -> int:
        """Threads given work and not yet handed back."""
        return self._threads - self._slots._value

    def for_call(self, max_bytes: int) -> CallDecoder:
        return CallDecoder(self, max_bytes)

    async def fill(self, value: struct_pb2.Value, body: bytes) -> Any:
        """Parses ``body`` into ``value``; returns the parsed document. Raises NotDecoded."""
        return await self.run(len(body), fill, value, body)

    async def run(self, size: int, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)``: on the loop when ``size`` (the bytes it handles) is small, else on a
        thread. Copying a decoded 1 MiB body between messages costs 10-15 ms: it goes here too."""
        if size <= OFF_LOOP_BYTES:
            return work(*args)
        await self._slots.acquire()
        try:
            done = self._executor.submit(work, *args)
        except BaseException:
            self._slots.release()
            raise
        # The slot is given back when the thread is done, not when the caller stops waiting:
        # a cancelled caller returns at once, the thread finishes that one piece of work (it
        # cannot be interrupted) and no other work queues behind it. At most ``threads``
        # pieces are in flight, whatever the number of calls.
        loop = asyncio.get_running_loop()
        done.add_done_callback(lambda _: _call_soon(loop, self._slots.release))
        return await asyncio.wrap_future(done)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class CallDecoder:
    """What one call may still decode: ``server.max_decoded_bytes`` of bodies in all."""

    def __init__(self, decoder: JsonDecoder, max_bytes: int) -> None:
        self._decoder = decoder
        self._max_bytes = max_bytes
        self.used = 0
        self.undecoded: set[str] = set()  # targets whose body was tried and not decoded

    async def run(self, size: int, work: Callable[..., T], *args: Any) -> T:
        """JsonDecoder.run: work on decoded bodies that need not count against the allowance."""
        return await self._decoder.run(size, work, *args)

    def __repr__(self) -> str:
        return f"<CallDecoder [{self.used}/{self._max_bytes} bytes decoded]>"

    def charge(self, size: int, target_id: str) -> None:
        """Counts ``size`` bytes of target ``target_id`` against the call's allowance; raises
        NotDecoded (and counts nothing) when they do not fit."""
        if self.used + size > self._max_bytes:
            self.undecoded.add(target_id)
            raise NotDecoded(
                f"JSON not decoded: {size} bytes would take the bodies decoded in this call "
                f"past server.max_decoded_bytes ({self._max_bytes})"
            )
        self.used += size

    async def fill(self, value: struct_pb2.Value, body: bytes, target_id: str) -> Any:
        """Parses target ``target_id``'s ``body`` into ``value`` within the call's allowance;
        returns the document.

        Raises NotDecoded: with a sentence past the allowance or when too deep, without one
        when the body is not JSON. A body refused for size does not use up the allowance."""
        self.charge(len(body), target_id)
        try:
            return await self._decoder.fill(value, body)
        except NotDecoded:
            self.undecoded.add(target_id)
            raise


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
        loop.call_soon_threadsafe(callback)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def fill(value: struct_pb2.Value, body: bytes) -> Any:
    """The blocking part: parse, check the depth, build. Raises NotDecoded."""
    try:
        document = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise NotDecoded() from None
    check_depth(document)
    try:
        _build(value, document)
    except (ValueError, OverflowError):  # an integer too large for a double
        value.Clear()
        raise NotDecoded() from None
    return document


def check_depth(document: Any) -> None:
    """Raises NotDecoded when ``document`` is deeper than a Value the caller can parse."""
    if not _shallow(document, MAX_MESSAGE_DEPTH):
        raise NotDecoded(
            f"JSON not decoded: nested deeper than a protobuf Value can carry "
            f"({MAX_MESSAGE_DEPTH} message levels; an object takes 3, an array 2)"
        )


def _shallow(document: Any, levels: int) -> bool:
    """Whether ``document`` fits in ``levels`` message levels, containers only walked."""
    if isinstance(document, dict):
        if levels < 4:  # 3 for the object, 1 for a member's Value
            return not document
        return all(
            _shallow(member, levels - 3)
            for member in document.values()
            if isinstance(member, (dict, list))
        )
    if isinstance(document, list):
        if levels < 3:
            return not document
        return all(
            _shallow(member, levels - 2) for member in document if isinstance(member, (dict, list))
        )
    return levels >= 1


def _build(value: struct_pb2.Value, document: Any) -> None:
    if isinstance(document, dict):
        value.struct_value.SetInParent()
        value.struct_value.update(document)
    elif isinstance(document, list):
        value.list_value.SetInParent()
        value.list_value.extend(document)
    elif isinstance(document, str):
        value.string_value = document
    elif isinstance(document, bool):
        value.bool_value = document
    elif isinstance(document, (int, float)):
        value.number_value = document
    else:
        value.null_value = struct_pb2.NULL_VALUE
