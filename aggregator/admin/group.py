"""One pod, one view: with ``server.workers`` > 1 the admin page shows the whole process group.

Every worker binds the admin port with SO_REUSEPORT, so the kernel hands each request to one
of them, which knows only its own upstreams and aggregates. Each worker therefore also serves
its own JSON, unmerged, on a unix socket in a folder private to the group (made by the workers'
parent, mode 0700, ``AGGREGATOR_WORKERS_DIR``); the worker answering a request on the admin
port asks the others there and merges their answers with its own. Nothing is shared or copied
while calls run: the cost is paid by the admin page's requests only (one request per other
worker, at most ``PEER_TIMEOUT`` each; a worker that does not answer is left out, and the
answer says how many did).

Merging is exact where it can be: an upstream's last-minute latency histogram and counts are
added up before its percentiles are read (admin/rolling.py); in-flight calls and concurrency
limits add up; a breaker shows its worst state; aggregates are merged newest (or slowest)
first, each worker numbering its own so that no two share a number (admin/recent.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from aggregator.admin.rolling import add_windows, summary_of

WORKERS_DIR = "AGGREGATOR_WORKERS_DIR"  # the group's private folder, set by the parent
WORKER = "AGGREGATOR_WORKER"  # this worker's index in the group
PEER_TIMEOUT = 1.0  # seconds a peer has to answer
BREAKER_ORDER = ("none", "closed", "half-open", "open")


@dataclass(frozen=True, slots=True)
class Group:
    """This worker's place in the process group: the group's folder, its index, the size."""

    folder: Path
    index: int
    size: int

    @classmethod
    def from_environ(cls, size: int) -> Group | None:
        """The group a worker of ``server.workers`` = ``size`` is in; None for one process."""
        folder, index = os.environ.get(WORKERS_DIR), os.environ.get(WORKER)
        if size < 2 or not folder or index is None:
            return None
        return cls(Path(folder), int(index), size)

    @property
    def socket(self) -> str:
        return self._socket_of(self.index)

    def _socket_of(self, index: int) -> str:
        return str(self.folder / f"admin-{index}.sock")

    async def ask(self, path_qs: str) -> list[dict[str, Any]]:
        """The other workers' answers to ``path_qs`` (200 answers only)."""
        others = [self._socket_of(i) for i in range(self.size) if i != self.index]
        answers = await asyncio.gather(*(_get(path, path_qs) for path in others))
        return [answer for answer in answers if answer is not None]


async def _get(socket: str, path_qs: str) -> dict[str, Any] | None:
    connector = aiohttp.UnixConnector(path=socket)
    timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT)
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get(f"http://localhost{path_qs}") as response,
        ):
            if response.status == 200:
                found: dict[str, Any] = await response.json()
                return found
    return None


def merge_upstreams(answers: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each upstream once, over the workers that answered (rows carry their ``window``)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for answer in answers:
        for row in answer["upstreams"]:
            rows.setdefault(row["name"], []).append(row)
    return [_merged_row(same) for same in rows.values()]


def _merged_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    first = rows[0]
    window = add_windows([row["window"] for row in rows])
    return {
        "name": first["name"],
        "kind": first["kind"],
        "endpoints": {
            state: max(row["endpoints"][state] for row in rows) for state in ("active", "ejected")
        },
        "breaker": max((row["breaker"] for row in rows), key=_breaker_rank),
        "in_flight": sum(row["in_flight"] for row in rows),
        "concurrency_limit": sum(row["concurrency_limit"] for row in rows),
        **summary_of(window),
        "workers": len(rows),
    }


def _breaker_rank(state: str) -> int:
    return BREAKER_ORDER.index(state) if state in BREAKER_ORDER else len(BREAKER_ORDER)


def merge_aggregates(answers: list[dict[str, Any]], slowest: bool, limit: int) -> dict[str, Any]:
    """Every worker's recent aggregates as one list: newest first, or slowest first."""
    rows = [row for answer in answers for row in answer["aggregates"]]
    if slowest:
        rows.sort(key=lambda row: row["elapsed_ms"], reverse=True)
    else:
        rows.sort(key=lambda row: (row["ended_at"], row["seq"]), reverse=True)
    return {
        "kept": sum(answer["kept"] for answer in answers),
        "keep": sum(answer["keep"] for answer in answers),
        "workers": len(answers),
        "aggregates": rows[:limit],
    }


def merge_config(own: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """This worker's config info, and every worker's (they may differ while a reload spreads)."""
    every = [own, *others]
    return {**own, "workers": every, "same": len({info["sha256"] for info in every}) == 1}
