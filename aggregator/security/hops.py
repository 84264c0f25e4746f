"""How many aggregators a call has come through, so that one cannot call itself forever.

A gRPC upstream may be an aggregator: this one (configured by mistake, or on purpose by a
caller who nests an ``AggregateRequest`` in a target's ``request`` bytes) or another that calls
back. Every gRPC call this server makes carries ``x-aggregator-hops``: the count it received,
plus one. A call that arrives having come through more than ``MAX_HOPS`` aggregators is refused
with FAILED_PRECONDITION before anything else is done: a loop ends at its third call, and a
caller's ``for_each`` cannot multiply it past ``max_targets`` squared refused calls.

The count travels in a context variable: set by the server for the call it handles, read where
the gRPC upstream builds its metadata (the call's tasks inherit the context).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

import grpc

from aggregator.errors import CallFailure

KEY = "x-aggregator-hops"
# Aggregators a call may have come through before this one: a caller's aggregator may call one
# more aggregator, which may not call a third.
MAX_HOPS = 1
_COUNT = re.compile(r"^[0-9]{1,3}\Z")

_received: ContextVar[int] = ContextVar("aggregator_hops", default=0)


def enter(metadata: Iterable[tuple[str, Any]]) -> None:
    """Notes the incoming call's count for the calls it makes; raises CallFailure when it has
    come through too many aggregators (or says so in a value that is not a count)."""
    hops = 0
    for key, value in metadata:
        if key != KEY:
            continue
        if not isinstance(value, str) or not _COUNT.match(value):
            raise CallFailure(
                grpc.StatusCode.INVALID_ARGUMENT, f"metadata {KEY}: {value!r} is not a count"
            )
        hops = max(hops, int(value))  # a caller's own value can raise the count, never lower it
    if hops > MAX_HOPS:
        raise CallFailure(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"this call has come through {hops} aggregators ({KEY}), more than {MAX_HOPS}: "
            "a gRPC upstream that is an aggregator calls back into one (a loop?)",
        )
    _received.set(hops)


def outgoing() -> tuple[str, str]:
    """The metadata entry for a call this server makes on behalf of the current one."""
    return KEY, str(_received.get() + 1)
