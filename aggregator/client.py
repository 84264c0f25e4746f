"""`aggregator call`: send one AggregateRequest to a running server and draw it as it streams in.

The request is JSON (the proto3 JSON mapping of ``aggregator.v1.AggregateRequest``: camelCase or
the proto's own field names, durations as ``"0.3s"``, bytes as base64) or the same structure in
YAML, from a file or ``-`` for stdin::

    targets:
      - id: catalog
        http: {upstream: catalog, path: /products/A-1042}
        decode_json: true
      - id: pricing
        grpc: {upstream: pricing, method: /shop.Pricing/Get, request: CgZBLTEwNDI=}
        timeout: 0.3s

A named aggregate (configured on the server) is called by name instead, with its parameters::

    aggregator call --aggregate product_page -p sku=A-1042 -p locale=fr -p 'count:=3'

(``KEY=VALUE`` sends a string; ``KEY:=JSON`` a JSON value: a number, true, a list...)

Exit status: 0 when the call ends OK, 1 when it ends with another status, 2 when the request
or an option is unusable (then nothing is sent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
import yaml
from google.protobuf import json_format

from aggregator.durations import parse_duration
from aggregator.timeline import (
    Style,
    Timeline,
    TimelineView,
    body_lines,
    is_terminal,
    status_details_lines,
    status_line,
    trailer_lines,
)
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from aggregator.vocabulary import METADATA_KEY

_TICK = 0.1  # seconds between redraws of a live chart
_PROTO_DURATION = re.compile(r"^-?[0-9]+(\.[0-9]{1,9})?s\Z")  # the proto3 JSON form of a Duration
Metadata = tuple[tuple[str, str | bytes], ...]


class UsageError(Exception):
    """The request or an option cannot be used; the message says what and where."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to call: the server's address, deadline, metadata and TLS."""

    address: str
    timeout: float | None = None  # seconds; None sends no deadline (the server's default applies)
    metadata: Metadata = ()
    tls: bool = False
    ca: bytes | None = None  # PEM; None: grpc's default roots
    cert: bytes | None = None  # PEM client chain, for servers that require mTLS
    key: bytes | None = None
    server_name: str = ""  # the name to verify in the server's certificate, if not the host

    def channel(self) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(self.address)
        credentials = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        options = (("grpc.ssl_target_name_override", self.server_name),) if self.server_name else ()
        return grpc.aio.secure_channel(self.address, credentials, options)


@dataclass(frozen=True, slots=True)
class Ending:
    """How a call ended, as the caller saw it."""

    code: grpc.StatusCode
    details: str
    trailers: Metadata
    request_id: str


def load_request(source: str, stdin: TextIO | None = None) -> pb.AggregateRequest:
    """The request in ``source`` (a path, or ``-`` for ``stdin``); UsageError names the problem."""
    name = "stdin" if source == "-" else source
    text = _read(source, stdin or sys.stdin)
    raw = _parse(text, name)
    _check_durations(raw, name)
    try:
        return json_format.ParseDict(raw, pb.AggregateRequest())
    except (json_format.ParseError, TypeError, ValueError) as exc:
        problem = " ".join(str(exc).split())
        raise UsageError(f"{name}: not an aggregator.v1.AggregateRequest: {problem}") from exc


def _read(source: str, stdin: TextIO) -> str:
    if source == "-":
        return stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{source}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source}: cannot read: not UTF-8 text ({exc.reason})") from exc


def _parse(text: str, name: str) -> dict[str, Any]:
    if not text.strip():
        raise UsageError(f"{name}: empty (expected an AggregateRequest as JSON or YAML)")
    try:
        raw = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{name}: not valid JSON: {exc}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{name}: not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise UsageError(f"{name}: must be a mapping with a targets list, got {kind}")
    return raw


def _check_durations(raw: dict[str, Any], name: str) -> None:
    """Request timeouts are proto Durations (``"0.1s"``), unlike the config's ``100ms``: protobuf's
    own error for ``"100ms"`` (``invalid literal for int()``) would not say so."""
    targets = raw.get("targets")
    for index, target in enumerate(targets if isinstance(targets, list) else ()):
        value = target.get("timeout") if isinstance(target, dict) else None
        if isinstance(value, str) and not _PROTO_DURATION.match(value):
            where = f"target {target.get('id')!r}" if target.get("id") else f"targets[{index}]"
            raise UsageError(
                f"{name}: {where}: timeout {value!r} is not a proto Duration: request durations "
                'are seconds with an "s" suffix ("0.1s", "2s", "1.5s"), not config durations '
                'like "100ms"'
            )


def parse_metadata(items: Sequence[str]) -> Metadata:
    """``key=value`` pairs as gRPC metadata (keys lowercased; ``-bin`` values sent as bytes)."""
    metadata: list[tuple[str, str | bytes]] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not METADATA_KEY.match(key) or key.startswith("grpc-"):
            raise UsageError(f"--metadata {item!r}: expected key=value, key of [0-9a-z_.-]")
        metadata.append((key, value.encode() if key.endswith("-bin") else value))
    return tuple(metadata)


def parse_timeout(text: str) -> float:
    """``2s``, ``500ms``, ``1m`` or plain seconds (``1.5``)."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise UsageError(f"--timeout: {exc}") from exc
    if seconds <= 0:
        raise UsageError(f"--timeout: {text!r} must be longer than 0")
    return seconds


async def aggregate(
    channel: grpc.aio.Channel,
    request: pb.AggregateRequest,
    view: TimelineView,
    timeout: float | None = None,
    metadata: Metadata = (),
) -> Ending:
    """Sends ``request``, feeding ``view`` each result as it arrives; never raises on a status."""
    stub = pb_grpc.AggregatorStub(channel)  # type: ignore[no-untyped-call]
    view.start()
    call = stub.Aggregate(request, timeout=timeout, metadata=metadata or None)
    async with _ticking(view):
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for result in call:
                view.add(result)
    initial = dict(await call.initial_metadata() or ())
    return Ending(
        code=await call.code(),
        details=await call.details() or "",
        trailers=tuple(await call.trailing_metadata() or ()),
        request_id=str(initial.get("x-request-id", "")),
    )


async def _call(target: Target, request: pb.AggregateRequest, view: TimelineView) -> Ending:
    async with target.channel() as channel:
        if request.aggregate:
            view.timeline.targets = await named_targets(channel, request.aggregate, target)
        return await aggregate(channel, request, view, target.timeout, target.metadata)


async def named_targets(
    channel: grpc.aio.Channel, name: str, target: Target
) -> tuple[pb.Target, ...]:
    """The target ids of named aggregate ``name`` (ListAggregates), so the live chart shows
    what is still running; none when the server does not say (the chart then shows results)."""
    stub = pb_grpc.AggregatorStub(channel)  # type: ignore[no-untyped-call]
    try:
        listed = await stub.ListAggregates(
            pb.ListAggregatesRequest(), timeout=target.timeout or 5.0, metadata=target.metadata
        )
    except grpc.aio.AioRpcError:
        return ()
    for info in listed.aggregates:
        if info.name == name:
            return tuple(pb.Target(id=target_id) for target_id in info.target_ids)
    return ()


def named_request(name: str, items: Sequence[str]) -> pb.AggregateRequest:
    """``--aggregate NAME -p KEY=VALUE ...`` as a request: VALUE a string, or ``KEY:=JSON``."""
    request = pb.AggregateRequest(aggregate=name)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or key == ":":
            raise UsageError(f"-p {item!r}: expected KEY=VALUE (a string) or KEY:=JSON")
        if key.endswith(":"):
            try:
                parsed: Any = json.loads(value)
            except ValueError as exc:
                raise UsageError(f"-p {item!r}: not JSON after := ({exc})") from exc
            key = key[:-1]
        else:
            parsed = value
        if key in request.params.fields:
            raise UsageError(f"-p {item!r}: parameter {key!r} given twice")
        request.params.update({key: parsed})
    return request


@contextlib.asynccontextmanager
async def _ticking(view: TimelineView) -> AsyncIterator[None]:
    """Redraws a live chart every _TICK seconds, so running targets' bars grow."""
    if not view.live:
        yield
        return

    async def tick() -> None:
        while True:
            await asyncio.sleep(_TICK)
            view.tick()

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def ending_lines(ending: Ending, timeline: Timeline, elapsed: float) -> list[str]:
    """The status, what never arrived, and the trailers."""
    style = timeline.style
    status = status_line(ending.code.name, ending.details, elapsed, style)
    if ending.request_id:
        status += f"  (x-request-id {ending.request_id})"
    lines = [status, *(f"  {line}" for line in status_details_lines(ending.trailers))]
    missing = [target.id for target in timeline.pending()]
    if missing and ending.code != grpc.StatusCode.OK:
        lines.append(f"no result for: {', '.join(missing)}")
    return [*lines, *trailer_lines(ending.trailers, style)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "request",
        nargs="?",
        help="the AggregateRequest as a JSON or YAML file; - for stdin (or use --aggregate)",
    )
    parser.add_argument(
        "--aggregate", metavar="NAME", help="run the server's named aggregate NAME instead"
    )
    parser.add_argument(
        "-p", "--param", action="append", default=[], metavar="KEY=VALUE",
        help="a parameter of --aggregate: KEY=VALUE (a string) or KEY:=JSON; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--address", default="127.0.0.1:50051", help="server host:port (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout", help="deadline sent with the call: 2s, 500ms, 1.5 (default: none sent)"
    )
    parser.add_argument(
        "-H", "--metadata", action="append", default=[], metavar="KEY=VALUE",
        help="request metadata, e.g. authorization='Bearer ...'; repeatable",
    )  # fmt: skip
    parser.add_argument("--bodies", action="store_true", help="print every result's body too")
    tls = parser.add_argument_group("TLS (plaintext unless one of these is given)")
    tls.add_argument("--tls", action="store_true", help="TLS, verified with grpc's default roots")
    tls.add_argument("--tls-ca", metavar="PEM", help="CA bundle that verifies the server")
    tls.add_argument("--tls-cert", metavar="PEM", help="client certificate chain (mTLS)")
    tls.add_argument("--tls-key", metavar="PEM", help="client private key (mTLS)")
    tls.add_argument("--tls-server-name", metavar="NAME", help="name to verify, if not the host")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The `call` command: 0 on status OK, 1 on another status, 2 on unusable input."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        return _run(args, out, err)
    except BrokenPipeError:
        # `aggregator call ... | head`: the reader left. Say nothing more (Python's own advice:
        # point stdout at devnull so the flush at exit raises no second error).
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 1


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        request = _request(args)
        target = _target(args)
    except UsageError as exc:
        print(f"aggregator call: {exc}", file=err)
        return 2
    style = Style.for_stream(out)
    view = TimelineView(out, Timeline(request.targets, style), live=is_terminal(out))
    if request.aggregate:
        print(f"aggregate {request.aggregate!r} to {target.address}", file=out)
    else:
        print(f"aggregate of {len(request.targets)} targets to {target.address}", file=out)
    try:
        ending = asyncio.run(_call(target, request, view))
    except KeyboardInterrupt:
        return 130
    finally:
        view.finish()
    elapsed = view.elapsed()
    lines = body_lines(view.timeline.rows, style) if args.bodies else []
    lines += ending_lines(ending, view.timeline, elapsed)
    print("\n".join(lines), file=out)
    return 0 if ending.code == grpc.StatusCode.OK else 1


def _request(args: argparse.Namespace) -> pb.AggregateRequest:
    if args.aggregate is not None:
        if args.request is not None:
            raise UsageError("give a request file or --aggregate, not both")
        return named_request(args.aggregate, args.param)
    if args.param:
        raise UsageError("-p/--param fills the parameters of --aggregate")
    if args.request is None:
        raise UsageError("a request file (or - for stdin), or --aggregate NAME, is required")
    return load_request(args.request)


def _target(args: argparse.Namespace) -> Target:
    tls = bool(args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    return Target(
        address=args.address,
        timeout=parse_timeout(args.timeout) if args.timeout else None,
        metadata=parse_metadata(args.metadata),
        tls=tls,
        ca=_pem(args.tls_ca, "--tls-ca"),
        cert=_pem(args.tls_cert, "--tls-cert"),
        key=_pem(args.tls_key, "--tls-key"),
        server_name=args.tls_server_name or "",
    )


def _pem(path: str | None, option: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read: {exc.strerror}") from exc
