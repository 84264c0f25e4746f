"""What a caller wrote: each target of an AggregateRequest read once, as the planner reads it.

A read of a upb message's field makes a new wrapper every time, so plan.py reads each target
once into a ``Written``; ``heads`` reads the few fields every target has and proves from the
request's size (counted in C) when no other field is set anywhere, and then ``bare`` takes the
defaults without reading them; otherwise ``read`` reads the target whole. Nothing is checked
here: the rules are plan.py's (what a caller may write) and request.py's (what an upstream
accepts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from google.protobuf import struct_pb2

from aggregator.request import GrpcRequest, HttpRequest
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import BODILESS_METHODS

Call = pb.HttpCall | pb.GrpcCall


class Written(NamedTuple):
    """A target as its caller wrote it, each field read once: a read of a upb message's field
    makes a new wrapper every time (0.1-0.9 µs a read, measured), and the rules read these."""

    target: pb.Target
    id: str
    kind: str | None  # "http", "grpc" or None (neither set)
    call: Call | None
    upstream: str  # the call's upstream ("" without a call)
    request: HttpRequest | GrpcRequest | None  # what the call asks, its JSON payload not read
    json: struct_pb2.Value | None  # the call's JSON payload, not read yet
    timeout: int | None  # nanoseconds
    depends_on: Sequence[str]
    for_each: str
    required: bool
    fallback: struct_pb2.Value | None
    decode_json: bool


# A target's first fields: (target, id, its HTTP call or None, its upstream, its path).
Head = tuple[pb.Target, str, "pb.HttpCall | None", str, str]


def heads(targets: Sequence[pb.Target]) -> tuple[list[Head], int]:
    """Each target's id, HTTP call, upstream and path, and the bytes these take in the request.

    When the request's size (``ByteSize``, counted in C) is just that, no other field is set
    anywhere in it: every other field holds its default and need not be read (``bare``), which
    halves the reads of a plain REST target (measured). Only what was read is counted, and only
    a call whose upstream is set (so it is present): any field more, even one at its default in
    a oneof or an unknown one, takes at least a byte and sends the request to ``read``."""
    heads: list[Head] = []
    size = 0
    for target in targets:
        target_id = target.id
        call: pb.HttpCall | None = target.http
        upstream = call.upstream  # type: ignore[union-attr]
        path = call.path  # type: ignore[union-attr]
        if not upstream:  # no HTTP call, or one without its upstream: the request read whole
            call, size = None, -1  # no request's size
        elif size >= 0:
            size += _bare_size(target_id, upstream, path)
        heads.append((target, target_id, call, upstream, path))
    return heads, size


def _bare_size(target_id: str, upstream: str, path: str) -> int:
    """The bytes a target of an id and an HTTP call of an upstream and a path takes in its
    request: each field its tag, its length (a varint) and its UTF-8 bytes; none when empty."""
    text = target_id + upstream + path
    size = (
        len(text) + _BARE_FIXED + (_PATH_TAG + 1 if path else 0) + (_ID_TAG + 1 if target_id else 0)
    )
    if size < 0x80 and text.isascii():  # the usual: each length one byte, a byte a character
        return size
    inner = _UPSTREAM_TAG + _text_size(upstream) + (_PATH_TAG + _text_size(path) if path else 0)
    own = (_ID_TAG + _text_size(target_id) if target_id else 0) + _HTTP_TAG + inner
    own += _varint_size(inner)
    return _TARGET_TAG + own + _varint_size(own)


def _text_size(text: str) -> int:
    length = len(text) if text.isascii() else len(text.encode())
    return length + _varint_size(length)


def _varint_size(value: int) -> int:
    return (value.bit_length() + 6) // 7 or 1


def _tag_size(message: Any, name: str) -> int:
    return _varint_size(message.DESCRIPTOR.fields_by_name[name].number << 3)


_TARGET_TAG = _tag_size(pb.AggregateRequest, "targets")
_ID_TAG = _tag_size(pb.Target, "id")
_HTTP_TAG = _tag_size(pb.Target, "http")
_UPSTREAM_TAG = _tag_size(pb.HttpCall, "upstream")
_PATH_TAG = _tag_size(pb.HttpCall, "path")
# Tags, and a byte of length each, of the request's target, the target's call and its upstream.
_BARE_FIXED = _TARGET_TAG + _HTTP_TAG + _UPSTREAM_TAG + 3


def bare(head: Head) -> Written:
    """A target of a request that holds nothing but ids, HTTP upstreams and paths."""
    target, target_id, call, upstream, path = head
    # tuple.__new__ as NamedTuple._make does: a third of calling Written (measured).
    return _new(
        Written,
        (target, target_id, "http", call, upstream, HttpRequest("GET", path, (), (), None),
         None, None, (), "", False, None, False),
    )  # fmt: skip


_new = tuple.__new__


def read(head: Head) -> Written:
    """A target read whole."""
    target, target_id, http, upstream, path = head
    kind = "http" if http is not None else target.WhichOneof("call")
    call: Call | None = None
    request: HttpRequest | GrpcRequest | None = None
    json = None
    if kind == "http":
        call = http if http is not None else target.http
        request = _http_request(call, path)
        if request.json_body is UNREAD:  # read from the payload already
            json = call.json
    elif kind == "grpc":
        call = target.grpc
        upstream = call.upstream
        request = _grpc_request(call)
        if call.HasField("json"):
            json = call.json
    return Written(
        target, target_id, kind, call, upstream, request, json,
        target.timeout.ToNanoseconds() if target.HasField("timeout") else None,
        target.depends_on, target.for_each, target.required,
        target.fallback if target.HasField("fallback") else None,
        target.decode_json,
    )  # fmt: skip


def _http_request(call: pb.HttpCall, path: str) -> HttpRequest:
    """The request a call makes, its JSON payload not read yet (plan.py reads it; until
    then the payload stands as an empty body, so the body rules see that there is one)."""
    method = call.method or "GET"
    body = json_body = None
    payload = call.WhichOneof("payload")
    if payload == "body" and (call.body or method not in BODILESS_METHODS):
        body = call.body  # an empty body on a bodiless method is no body
    elif payload == "json":
        body, json_body = b"", UNREAD
    return HttpRequest(
        method,
        path,
        _pairs(call.query),
        _pairs(call.headers),
        body,
        json_body,
    )


UNREAD = object()  # a JSON payload not read yet


def _grpc_request(call: pb.GrpcCall) -> GrpcRequest:
    return GrpcRequest(call.method, call.request, _pairs(call.metadata))


def _pairs(entries: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A map's entries sorted (read by key: a map's items() walks it in Python)."""
    if not entries:
        return ()
    return tuple(sorted([(key, entries[key]) for key in entries]))
