"""The admin page's web app (docs/admin.md): ``/``, ``/aggregates/<request id>`` and the JSON they
read, ``/api/upstreams``, ``/api/aggregates`` and ``/api/aggregates/<request id>``.

Only fixed routes: the page's files are read from the package once, at start. A path that is
not one of them answers 404, a query string that is not understood 400, an error of ours 500
with one sentence: never a stack trace.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qsl

from aiohttp import hdrs, web

from aggregator.admin.group import Group, merge_aggregates, merge_config, merge_upstreams
from aggregator.admin.recent import AggregateRecord, Recent
from aggregator.hosts import bare_host, is_loopback
from aggregator.vocabulary import REQUEST_ID

log = logging.getLogger("aggregator.admin")

MAX_QUERY = 256  # bytes of a query string
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_FILES = {  # URL path: (file in aggregator/admin/static, content type)
    "/": ("overview.html", "text/html"),
    "/static/admin.css": ("admin.css", "text/css"),
    "/static/overview.js": ("overview.js", "text/javascript"),
    "/static/waterfall.js": ("waterfall.js", "text/javascript"),
}


class UpstreamView(Protocol):
    """What the page shows of an upstream beyond its rolling minute (policies/endpoint.py)."""

    def admin_stats(self) -> dict[str, Any]: ...


# The config in force (its SHA-256, when it was loaded) and the last reload (aggregator/reload.py).
ConfigInfo = Callable[[], dict[str, Any]]


class BadQuery(Exception):
    """A query string the API does not understand: 400 with this sentence."""


def make_app(
    recent: Recent,
    upstreams: Mapping[str, UpstreamView],
    hosts: Iterable[str] = (),
    config_info: ConfigInfo | None = None,
    group: Group | None = None,
    peer: bool = False,
) -> web.Application:
    """The admin app, answering requests whose Host is a loopback name, the address the
    connection reached, or one of ``hosts`` (the admin address's host, server.admin_hosts).
    ``config_info`` says which config is in force and how its last reload went. With a
    ``group``, it answers for every worker of the process group; as a ``peer`` (on the group's
    unix socket), for this worker alone, with what merging needs (admin/group.py)."""
    pages = AdminPages(recent, upstreams, config_info, group, peer)
    app = web.Application(middlewares=[_guarded, HostCheck(hosts).middleware], client_max_size=1024)
    for path in _FILES:
        app.router.add_get(path, pages.static, allow_head=False)
    app.router.add_get("/aggregates/{request_id}", pages.waterfall, allow_head=False)
    app.router.add_get("/api/upstreams", pages.api_upstreams, allow_head=False)
    app.router.add_get("/api/aggregates", pages.api_aggregates, allow_head=False)
    app.router.add_get("/api/aggregates/{request_id}", pages.api_aggregate, allow_head=False)
    app.router.add_get("/api/config", pages.api_config, allow_head=False)
    return app


class AdminPages:
    """The handlers: the page's files (read once) and the JSON, from ``recent`` and the
    upstreams' policies."""

    def __init__(
        self,
        recent: Recent,
        upstreams: Mapping[str, UpstreamView],
        config_info: ConfigInfo | None = None,
        group: Group | None = None,
        peer: bool = False,
    ) -> None:
        self._recent = recent
        self._upstreams = upstreams
        self._config_info = config_info
        self._group = group
        self._peer = peer
        self._files = {path: (_read(name), kind) for path, (name, kind) in _FILES.items()}
        self._waterfall = _read("waterfall.html")

    def __repr__(self) -> str:
        return f"<AdminPages {self._recent!r} [{len(self._upstreams)} upstreams]>"

    async def static(self, request: web.Request) -> web.Response:
        _query(request, ())
        body, kind = self._files[request.path]
        return web.Response(body=body, content_type=kind, charset="utf-8")

    async def waterfall(self, request: web.Request) -> web.Response:
        await self._detail(request)  # 404 unless some worker has it
        return web.Response(body=self._waterfall, content_type="text/html", charset="utf-8")

    def _find(self, request: web.Request) -> AggregateRecord | None:
        """The aggregate a detail path names: by request id, and by ``?seq=`` when given (the
        overview's links carry it, so a caller reusing another's request id cannot take over
        the link to the other's aggregate)."""
        query = _query(request, ("seq",))
        seq = _seq(query["seq"]) if "seq" in query else None
        return self._recent.find(_request_id(request), seq)

    async def api_upstreams(self, request: web.Request) -> web.Response:
        _query(request, ())
        recent = self._recent
        if self._group is None and not self._peer:
            rows = [
                {"name": name, **view.admin_stats(), **recent.upstream_stats(name)}
                for name, view in self._upstreams.items()
            ]
            return web.json_response({"upstreams": rows})
        own = {
            "upstreams": [
                {"name": name, **view.admin_stats(), "window": recent.upstream_window(name)}
                for name, view in self._upstreams.items()
            ]
        }
        if self._peer:
            return web.json_response(own)
        assert self._group is not None
        answers = [own, *await self._group.ask(request.path_qs)]
        return web.json_response({"upstreams": merge_upstreams(answers), "workers": len(answers)})

    async def api_aggregates(self, request: web.Request) -> web.Response:
        query = _query(request, ("failed", "slowest", "limit"))
        recent = self._recent
        keep = recent.records.maxlen or 1
        failed = _flag(query.get("failed", "false"), "failed")
        slowest = _count(query["slowest"], "slowest", keep) if "slowest" in query else None
        limit = _count(query["limit"], "limit", keep) if "limit" in query else keep
        records = recent.newest(failed=failed, slowest=slowest)[:limit]
        own = {"kept": len(recent.records), "keep": keep,
               "aggregates": [r.summary() for r in records]}  # fmt: skip
        if self._group is None:
            return web.json_response(own)
        answers = [own, *await self._group.ask(request.path_qs)]
        most = min(limit, slowest) if slowest is not None else limit
        return web.json_response(merge_aggregates(answers, slowest is not None, most))

    async def api_config(self, request: web.Request) -> web.Response:
        """The config's hash and last reload; nulls when the server was not started from a
        file (nothing to reload)."""
        _query(request, ())
        info = self._config_info() if self._config_info is not None else {}
        own = {"sha256": None, "loaded_at": None, "last_reload": None, **info}
        if self._group is None:
            return web.json_response(own)
        return web.json_response(merge_config(own, await self._group.ask(request.path_qs)))

    async def api_aggregate(self, request: web.Request) -> web.Response:
        return web.json_response(await self._detail(request))

    async def _detail(self, request: web.Request) -> dict[str, Any]:
        """The aggregate a detail path names, from this worker or another of the group."""
        record = self._find(request)
        if record is not None:
            return record.detail()
        if self._group is not None:
            path = f"/api/aggregates/{_request_id(request)}?{request.rel_url.raw_query_string}"
            for answer in await self._group.ask(path.rstrip("?")):
                return answer
        raise web.HTTPNotFound(text="no such aggregate among the recent ones")


class HostCheck:
    """Which names the admin page answers to (docs/security.md, "The admin page").

    A page on any other origin that makes its own name resolve to this host (DNS rebinding:
    attacker.example -> 127.0.0.1) would otherwise read the page and its JSON from a browser
    on this host; its requests carry its own name in Host, and get 421 Misdirected Request.
    An IP literal cannot be rebound, so the address the connection reached is its own name.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self._names = frozenset(filter(None, map(bare_host, names)))

    def __repr__(self) -> str:
        return f"<HostCheck loopback names, the local address, {sorted(self._names)}>"

    def allows(self, request: web.Request) -> bool:
        host = _host_of(request.headers.get(hdrs.HOST, ""))
        if not host:
            return False
        if host in self._names or is_loopback(host):
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return address == _local_address(request)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self.allows(request):
            raise web.HTTPMisdirectedRequest(
                text="this admin page answers its own address, loopback names and "
                "server.admin_hosts only"
            )
        return await handler(request)


def _host_of(header: str) -> str | None:
    """The host a Host header names: without its port, IPv6 brackets or a final dot, lower
    case; None when the header is not a host[:port]."""
    if header.startswith("["):
        host, bracket, rest = header[1:].partition("]")
        port = rest.removeprefix(":") if bracket and rest.startswith(":") else rest
        if not bracket:
            return None
    else:
        host, _, port = header.partition(":")
    if port and not (port.isascii() and port.isdigit()):
        return None
    return bare_host(host)


def _local_address(request: web.Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address this connection reached (the admin address, when it is not a wildcard)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    try:
        address = ipaddress.ip_address(sockname[0]) if sockname else None
    except ValueError:
        return None
    # An IPv4 connection to a dual-stack [::] socket reaches ::ffff:10.0.0.5, named 10.0.0.5.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@web.middleware
async def _guarded(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Security headers on every answer; a query the API refuses is 400, a bug 500, and
    neither shows more than a sentence."""
    try:
        response = await handler(request)
    except BadQuery as refused:
        response = _error(400, str(refused))
    except web.HTTPException as answer:
        response = _error(answer.status, answer.text or answer.reason)
        if answer.status == 405:
            response.headers["Allow"] = "GET"
    except Exception:  # a bug of ours: logged here, one sentence there
        log.exception("admin page: %s %s failed", request.method, request.path)
        response = _error(500, "internal error (logged)")
    response.headers.update(_HEADERS)
    return response


def _error(status: int, sentence: str) -> web.Response:
    if status == 405:
        sentence = "only GET"
    return web.json_response({"error": sentence.strip()}, status=status)


def _read(name: str) -> bytes:
    return resources.files("aggregator.admin").joinpath("static", name).read_bytes()


def _request_id(request: web.Request) -> str:
    request_id = request.match_info["request_id"]
    if not REQUEST_ID.match(request_id):
        raise web.HTTPNotFound(text="not a request id")
    return request_id


def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string as a dict: short, each name once and known, or BadQuery."""
    raw = request.rel_url.raw_query_string
    if len(raw) > MAX_QUERY:
        raise BadQuery(f"query string longer than {MAX_QUERY} bytes")
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=bool(raw), errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise BadQuery("malformed query string") from None
    query: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise BadQuery(f"unknown query parameter {name[:32]!r} (known: {known})")
        if name in query:
            raise BadQuery(f"query parameter {name!r} given twice")
        query[name] = value
    return query


def _flag(value: str, name: str) -> bool:
    if value in ("true", "false"):
        return value == "true"
    raise BadQuery(f"{name}: {value[:32]!r} is not true or false")


def _seq(value: str) -> int:
    if value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    raise BadQuery(f"seq: {value[:32]!r} is not an aggregate's number")


def _count(value: str, name: str, most: int) -> int:
    if value.isascii() and value.isdigit() and 0 < len(value) <= 7 and 1 <= int(value) <= most:
        return int(value)
    raise BadQuery(f"{name}: {value[:32]!r} is not a whole number from 1 to {most}")
