"""A gRPC upstream's descriptors, from its own server reflection or a file, cached per upstream.

Reflection is asked ``grpc.reflection.v1`` first and ``v1alpha`` when v1 is UNIMPLEMENTED
(grpcio-reflection serves only v1alpha). The two are the same messages in two packages, so
one set of messages (v1alpha's) speaks both, as raw bytes on one stream: the list of services,
then the file defining each (with its imports), then any import still missing, by name.

What an upstream answers is bounded: services, files and bytes counted, the whole exchange
within the upstream's ``timeout`` (a connect within its ``connect_timeout``, as every call on
its channel). One fetch at a time per upstream (single flight), owned here and never cut by
the caller that started it; each caller waits for it within its own time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, message
from grpc_reflection.v1alpha import reflection_pb2

from aggregator.offload import Offload, OffloadBusy
from aggregator.schema import MethodSchema, Schema

MAX_SERVICES = 256
MAX_FILES = 1024
MAX_BYTES = 16 * 1024 * 1024
# A fetch that failed is not tried again before this (each caller is told the same failure):
# a reflection that hangs costs each caller its wait at most once in this time.
RETRY_FAILED_AFTER = 2.0
# A method nobody knows triggers a refresh (a redeployed upstream gained a method) at most
# this often: a caller naming unknown methods cannot make every call a reflection exchange.
REFRESH_AT_MOST_EVERY = 1.0
REFLECTION = ("grpc.reflection.v1", "grpc.reflection.v1alpha")
log = logging.getLogger("aggregator")


class DescriptorsUnavailable(Exception):
    """The upstream's descriptors cannot be had; the text says why (a target's UNAVAILABLE)."""


class UnknownMethod(Exception):
    """The upstream's descriptors have no such method (a request's INVALID_ARGUMENT)."""


@dataclass(frozen=True, slots=True)
class Reflected:
    """What an upstream's reflection sent: its files, as sent, and the services it lists."""

    files: tuple[bytes, ...]
    services: tuple[str, ...]
    origin: str

    def digest(self) -> str:
        """The same for the same files and services, whatever the order they came in."""
        digest = hashlib.sha256(self.origin.encode())
        names = [name.encode() for name in sorted(self.services)]
        for part in (*names, b"", *sorted(self.files)):  # each prefixed by its length
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        return digest.hexdigest()

    def schema(self, known: Schema | None) -> Schema:
        """``known`` when it was built from the same files, else a new Schema (CPU in
        proportion to the files: on a thread)."""
        digest = self.digest()
        if known is not None and known.digest == digest:
            return known
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in self.files]
        return Schema(files, self.services, self.origin, digest)


class Descriptors:
    """One upstream's descriptors, fetched once, cached, refreshed when a method is unknown."""

    def __init__(
        self,
        upstream: str,
        fetch: Callable[[], Awaitable[Reflected]] | None = None,
        schema: Schema | None = None,
    ) -> None:
        self.upstream = upstream
        self._fetch = fetch  # None: a file, loaded once
        self._schema = schema
        self._failure: tuple[str, float] | None = None  # sentence, when (monotonic)
        self._refreshed_at = -REFRESH_AT_MOST_EVERY
        self._task: asyncio.Task[Schema] | None = None
        self.fetches = 0
        self.builds = 0  # schemas built from what was fetched: identical files build none

    def __repr__(self) -> str:
        state = "fetching" if self._task is not None else "idle"
        counts = f"{self.fetches} fetches, {self.builds} builds"
        return f"<Descriptors {self.upstream} {self._schema!r} [{state}, {counts}]>"

    def cached(self, name: str) -> MethodSchema | None:
        """The schema of method ``name`` if the descriptors at hand have it (no fetch)."""
        return self._schema.find(name) if self._schema is not None else None

    async def method(self, name: str, wait: float, offload: Offload) -> MethodSchema:
        """The schema of method ``name``, waiting at most ``wait`` seconds for a fetch (its
        files built into a schema by ``offload``).

        Raises DescriptorsUnavailable or UnknownMethod, each with a sentence."""
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        schema = self._schema or await self._fetched(until, offload)
        found = schema.find(name)
        if found is None and schema.broken_reason(name) is None and self._may_refresh():
            with contextlib.suppress(DescriptorsUnavailable):  # then the old ones answer
                schema = await self._fetched(until, offload, refresh=True)
            found = schema.find(name)
        if found is not None:
            return found
        broken = schema.broken_reason(name)
        if broken is not None:
            raise DescriptorsUnavailable(f"descriptors of upstream {self.upstream!r}: {broken}")
        raise UnknownMethod(
            f"upstream {self.upstream!r} has no method {name!r} (per {schema.origin})"
        )

    def _may_refresh(self) -> bool:
        if self._fetch is None:
            return False
        now = time.monotonic()
        if now - self._refreshed_at < REFRESH_AT_MOST_EVERY:
            return False
        self._refreshed_at = now
        return True

    async def _fetched(self, until: float, offload: Offload, refresh: bool = False) -> Schema:
        if self._fetch is None:
            raise DescriptorsUnavailable(f"upstream {self.upstream!r} has no descriptors")
        if self._task is None:
            failure = self._failure
            if failure is not None and not refresh:
                sentence, at = failure
                if time.monotonic() - at < RETRY_FAILED_AFTER:
                    raise DescriptorsUnavailable(sentence)
            self._start(offload)
        task = self._task
        assert task is not None
        loop = asyncio.get_running_loop()
        # Waited for, never cancelled by a caller: others may be waiting for it too.
        await asyncio.wait((task,), timeout=max(0.0, until - loop.time()))
        if not task.done():
            raise DescriptorsUnavailable(
                f"descriptors of upstream {self.upstream!r}: its reflection did not answer in time"
            )
        if task.cancelled():
            raise DescriptorsUnavailable(f"descriptors of upstream {self.upstream!r}: cancelled")
        error = task.exception()
        if error is not None:
            raise DescriptorsUnavailable(str(error))
        return task.result()

    def _start(self, offload: Offload) -> None:
        assert self._fetch is not None
        self.fetches += 1
        fetch, known = self._fetch, self._schema

        async def fetched() -> Schema:
            reflected = await fetch()
            return await offload.thread(reflected.schema, known)

        self._task = asyncio.create_task(
            _guarded(self.upstream, fetched), name=f"descriptors {self.upstream}"
        )
        self._task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Schema]) -> None:
        self._task = None
        if task.cancelled():
            return
        error = task.exception()  # retrieved here, so never "never retrieved"
        if error is not None:
            self._failure = (str(error), time.monotonic())
            return
        schema, replaced = task.result(), self._schema
        self._schema, self._failure = schema, None
        if schema is not replaced:
            self.builds += 1
            if replaced is not None:
                del replaced
                # Its message classes sit in reference cycles, and the server collects the old
                # generation rarely (server._settle_heap): without this, each replaced pool
                # (about 20 times its files' size) stays until then. Rare: only when the
                # upstream's files changed.
                gc.collect()

    async def aclose(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait((task,))


async def _guarded(upstream: str, fetch: Callable[[], Awaitable[Schema]]) -> Schema:
    """``fetch()``, every expected failure turned into one sentence naming the upstream."""
    what = f"descriptors of upstream {upstream!r}"
    try:
        return await fetch()
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise DescriptorsUnavailable(
                f"{what}: it serves no server reflection (configure upstreams.{upstream}"
                ".descriptors with a descriptor set file)"
            ) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise DescriptorsUnavailable(f"{what}: its reflection did not answer in time") from None
        details = " ".join((exc.details() or "").split())[:200]
        raise DescriptorsUnavailable(
            f"{what}: reflection failed with {code.name}: {details}"
        ) from None
    except TimeoutError:
        raise DescriptorsUnavailable(f"{what}: its reflection did not answer in time") from None
    except (ReflectionError, OffloadBusy) as exc:
        raise DescriptorsUnavailable(f"{what}: {exc}") from None
    except Exception:  # a bug: logged, and the caller told no more than that
        log.exception("fetching the descriptors of upstream %r failed", upstream)
        raise DescriptorsUnavailable(f"{what}: internal error") from None


class ReflectionError(Exception):
    """The upstream's reflection answered something unusable."""


async def fetch_by_reflection(
    channel: grpc.aio.Channel, timeout: float, packages: tuple[str, str] = REFLECTION
) -> tuple[Reflected, str]:
    """The upstream's services and their files, by reflection v1 (v1alpha when v1 is
    UNIMPLEMENTED; ``packages`` in the order to ask), within ``timeout`` seconds in all;
    and the reflection package that answered."""
    async with asyncio.timeout(timeout):
        try:
            return await _exchange(channel, packages[0], timeout), packages[0]
        except grpc.aio.AioRpcError as exc:
            # INTERNAL too: a request grpc sends as the upstream ends the call UNIMPLEMENTED
            # ends it INTERNAL on our side ("Internal error from Core"), seen under load.
            if exc.code() not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL):
                raise
        return await _exchange(channel, packages[1], timeout), packages[1]


async def _exchange(channel: grpc.aio.Channel, package: str, timeout: float) -> Reflected:
    method = f"/{package}.ServerReflection/ServerReflectionInfo"
    requests: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def outgoing() -> AsyncIterator[bytes]:
        while (request := await requests.get()) is not None:
            yield request

    # Requests go through an iterator, not call.write(): a write racing the upstream's
    # UNIMPLEMENTED (v1 not served) ends the call as INTERNAL, hiding the status to fall back on.
    call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)(
        outgoing(), timeout=timeout
    )
    try:
        session = _Session(call, requests)
        services = await session.services()
        for service in services:
            if not session.defines(service):
                await session.files("file_containing_symbol", service)
        while missing := session.missing():
            for name in missing:
                await session.files("file_by_filename", name)
        # Built into a pool by Descriptors, off the loop, unless identical to the last ones.
        files = tuple(session.raw_by_name.values())
        return Reflected(files, tuple(services), f"its reflection ({package})")
    finally:
        requests.put_nowait(None)  # ends the iterator, so grpc's task consuming it ends too
        call.cancel()


class _Session:
    """One reflection stream: a request sent, its answer read, counted against the bounds."""

    def __init__(
        self, call: grpc.aio.StreamStreamCall[bytes, bytes], requests: asyncio.Queue[bytes | None]
    ) -> None:
        self._call = call
        self._requests = requests
        self.files_by_name: dict[str, descriptor_pb2.FileDescriptorProto] = {}
        self.raw_by_name: dict[str, bytes] = {}  # as sent: hashed, then parsed again off the loop
        self._defined: set[str] = set()
        self._asked: set[str] = set()
        self._bytes = 0

    async def _ask(self, **request: str) -> reflection_pb2.ServerReflectionResponse:
        self._requests.put_nowait(
            reflection_pb2.ServerReflectionRequest(**request).SerializeToString()
        )
        raw = await self._call.read()
        if not isinstance(raw, bytes):
            raise ReflectionError("its reflection closed the stream without answering")
        self._bytes += len(raw)
        if self._bytes > MAX_BYTES:
            raise ReflectionError(f"its reflection sent more than {MAX_BYTES} bytes")
        try:
            return reflection_pb2.ServerReflectionResponse.FromString(raw)
        except message.DecodeError:
            raise ReflectionError(
                "its reflection answered something that is not a ServerReflectionResponse"
            ) from None

    async def services(self) -> list[str]:
        answer = await self._ask(list_services="*")
        if answer.WhichOneof("message_response") != "list_services_response":
            raise ReflectionError("its reflection did not list its services")
        names = [
            service.name
            for service in answer.list_services_response.service
            if not service.name.startswith(REFLECTION)
        ]
        if len(names) > MAX_SERVICES:
            raise ReflectionError(f"its reflection lists more than {MAX_SERVICES} services")
        return names

    async def files(self, kind: str, name: str) -> None:
        self._asked.add(name)
        answer = await self._ask(**{kind: name})
        which = answer.WhichOneof("message_response")
        if which == "error_response":
            return  # the service or file is reported as missing when it is needed
        if which != "file_descriptor_response":
            raise ReflectionError(f"its reflection answered {which or 'nothing'} for {name}")
        for raw in answer.file_descriptor_response.file_descriptor_proto:
            self._add(raw)

    def _add(self, raw: bytes) -> None:
        file = descriptor_pb2.FileDescriptorProto()
        try:
            file.ParseFromString(raw)
        except message.DecodeError:
            raise ReflectionError("its reflection sent a file that is not a descriptor") from None
        if file.name in self.files_by_name:
            return
        if len(self.files_by_name) >= MAX_FILES:
            raise ReflectionError(f"its reflection sent more than {MAX_FILES} files")
        self.files_by_name[file.name] = file
        self.raw_by_name[file.name] = raw
        prefix = f"{file.package}." if file.package else ""
        self._defined.update(prefix + service.name for service in file.service)

    def defines(self, service: str) -> bool:
        return service in self._defined

    def missing(self) -> list[str]:
        """Imports not yet had nor asked for."""
        return sorted(
            {
                dep
                for file in self.files_by_name.values()
                for dep in file.dependency
                if dep not in self.files_by_name and dep not in self._asked
            }
        )
