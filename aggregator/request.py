"""What goes to an upstream: the request model, and every rule a final request must keep.

``HttpRequest`` and ``GrpcRequest`` are what the planner makes of a target and what the
transports send. ``HTTP_RULES``, ``GRPC_RULES`` and the per-entry ``HEADER_RULES`` /
``METADATA_RULES`` are the one table of what an upstream accepts: the planner walks it on the
requests it makes, security/outbound.py again on each request that changed since (forwarded
metadata, bound parameters, substituted values). Walked with short-circuit it is the fast
path (``request_allowed``); walked whole it lists the problems (``request_problems``), so the
two cannot disagree. Messages name fields, config keys and sizes, never the values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from aggregator.config import UpstreamConfig
from aggregator.errors import Problem, Rule, Rules
from aggregator.schema import MethodSchema
from aggregator.security.fields import (
    canonical_header,
    header_value_problem,
    path_allowed,
    path_problem,
)
from aggregator.substitution import Cap, Substitution
from aggregator.vocabulary import (
    BODILESS_METHODS,
    CONTROL_OR_SPACE,
    FRAMING_HEADERS,
    GRPC_METHOD,
    HTTP_METHODS,
    IDEMPOTENT_METHODS,
)

Pairs = tuple[tuple[str, str], ...]
# What a path may not hold: whitespace and control characters (CONTROL_OR_SPACE), ? and #.
PATH_STOPS = re.compile(CONTROL_OR_SPACE.pattern[:-1] + "?#]")


# The plan's classes are built for every target of every call, so they are slots dataclasses but
# not frozen: a frozen __init__ sets each field through object.__setattr__, which cost a third of
# make_plan (measured in instructions). They are read-only by convention: changed copies are
# made with dataclasses.replace, never by assignment.
@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    query: Pairs
    headers: Pairs
    body: bytes | None
    json_body: Any = None  # the JSON body as Python values, kept for substitution
    # A named aggregate's path before its parameters were bound (what the admin page shows:
    # parameters are the caller's values); empty when the path is as the caller wrote it.
    template: str = field(default="", compare=False)

    @property
    def idempotent(self) -> bool:
        """Safe to send twice: an idempotent method, or a caller's Idempotency-Key."""
        if self.method in IDEMPOTENT_METHODS:
            return True
        return any(name.lower() == "idempotency-key" for name, _ in self.headers)

    def rendered(
        self, substitution: Substitution, upstream: UpstreamConfig, max_path_bytes: int
    ) -> HttpRequest:
        """This request with every {{...}} reference replaced, each field counted against its
        cap as it is rendered (TargetFailure as soon as one would pass it)."""
        body = self.body
        if self.json_body is not None:
            cap = Cap("http.body", upstream.max_request_bytes, _key(upstream, "max_request_bytes"))
            value = substitution.json(self.json_body, cap)
            body = json.dumps(value, separators=(",", ":")).encode()
        path_cap = Cap("http.path", max_path_bytes, "server.max_path_bytes")
        return replace(
            self,
            path=substitution.path(self.path, path_cap),
            query=_rendered(
                self.query, substitution.text, Cap("http.query", max_path_bytes, path_cap.key)
            ),
            headers=_rendered(
                self.headers,
                substitution.header,
                Cap("http.headers", upstream.max_header_bytes, _key(upstream, "max_header_bytes")),
            ),
            body=body,
        )


@dataclass(slots=True)
class GrpcRequest:
    method: str
    request: bytes
    metadata: Pairs
    # GrpcCall.json as Python values (None: request bytes), encoded once the method's
    # schema is known (aggregator/grpc_json.py); json_size is GrpcCall.json's size in bytes.
    json_body: Any = None
    json_size: int = 0
    schema: MethodSchema | None = None
    unavailable: str = ""  # why the upstream's descriptors could not be had, when needed

    def rendered(
        self, substitution: Substitution, upstream: UpstreamConfig, max_path_bytes: int = 0
    ) -> GrpcRequest:
        """This request with every {{...}} reference in its JSON and metadata replaced (the
        substituted values counted against the upstream's caps as they are placed)."""
        json_body = self.json_body
        if json_body is not None:
            cap = Cap("grpc.json", upstream.max_request_bytes, _key(upstream, "max_request_bytes"))
            json_body = substitution.json(json_body, cap)
        return replace(
            self,
            json_body=json_body,
            metadata=_rendered(
                self.metadata,
                substitution.metadata,
                Cap("grpc.metadata", upstream.max_header_bytes, _key(upstream, "max_header_bytes")),
            ),
        )


def _rendered(pairs: Pairs, render: Any, cap: Cap) -> Pairs:
    """``pairs`` with their values rendered, all of them within one ``cap``."""
    if not pairs:
        return pairs
    out = []
    room = cap.limit
    for name, value in pairs:
        text = render(value, replace(cap, limit=room))
        room -= len(name) + len(text)
        out.append((name, text))
    return tuple(out)


def _key(upstream: UpstreamConfig, name: str) -> str:
    return f"upstreams.{upstream.name}.{name}"


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def query_bytes(query: Iterable[tuple[str, str]]) -> int:
    """The size that server.max_path_bytes caps: names and values, UTF-8, with = and &."""
    size = 0
    for name, value in query:
        size += (
            len(name) + len(value) + 2
            if value.isascii()
            else len(name.encode()) + len(value.encode()) + 2
        )
    return size


def pairs_bytes(pairs: Pairs) -> int:
    size = 0
    for name, value in pairs:
        size += len(name) + len(value) if value.isascii() else len(name) + len(value.encode())
    return size


def plain_path(path: str) -> bool:
    """A path with one reading and no dots: path_problem could find nothing in it."""
    return "." not in path and "%" not in path and ";" not in path and path.isascii()


def _body_field(r: HttpRequest, u: UpstreamConfig, m: int) -> str:
    return "http.json" if r.json_body is not None else "http.body"


def _pairs_field(r: HttpRequest | GrpcRequest, u: UpstreamConfig, m: int) -> str:
    return "http.headers" if isinstance(r, HttpRequest) else "grpc.metadata"


def grpc_method_allowed(method: str, allowed: Iterable[str]) -> bool:
    service = method.rsplit("/", 1)[0]
    return any(pattern in (method, service + "/*") for pattern in allowed)


def pairs_of(request: HttpRequest | GrpcRequest) -> Pairs:
    return request.headers if isinstance(request, HttpRequest) else request.metadata


# What the rules' predicates read.
_NAMES: dict[str, Any] = {
    "BODILESS_METHODS": BODILESS_METHODS,
    "PATH_STOPS": PATH_STOPS,
    "FRAMING_HEADERS": FRAMING_HEADERS,
    "GRPC_METHOD": GRPC_METHOD,
    "HTTP_METHODS": HTTP_METHODS,
    "canonical_header": canonical_header,
    "grpc_method_allowed": grpc_method_allowed,
    "header_value_problem": header_value_problem,
    "pairs_bytes": pairs_bytes,
    "pairs_of": pairs_of,
    "path_allowed": path_allowed,
    "path_problem": path_problem,
    "plain_path": plain_path,
    "query_bytes": query_bytes,
    "utf8_size": utf8_size,
}


# The rules, over (r: the request, u: its upstream, m: server.max_path_bytes). The path's are
# one chain (group "path"): reported at the first that fails.
def _pair_rules(pairs: str) -> tuple[Rule, ...]:
    """The count and size of headers (``pairs`` = "r.headers") or metadata ("r.metadata")."""
    return (
        Rule(
            _pairs_field,
            f"len({pairs}) <= u.max_headers",
            lambda r, u, m: (
                f"{len(pairs_of(r))} entries exceed {_key(u, 'max_headers')} ({u.max_headers})"
            ),
        ),
        Rule(
            _pairs_field,
            f"not {pairs} or pairs_bytes({pairs}) <= u.max_header_bytes",
            lambda r, u, m: (
                f"{pairs_bytes(pairs_of(r))} bytes of names and values exceed "
                f"{_key(u, 'max_header_bytes')} ({u.max_header_bytes})"
            ),
        ),
    )


HTTP_RULES = Rules(
    "r, u, m",
    (
        Rule(
            "http.method",
            "r.method in HTTP_METHODS",
            lambda r, u, m: f"is not one of {', '.join(sorted(HTTP_METHODS))}",
            "method",
        ),
        Rule(
            "http.method",
            "not u.allowed_methods or r.method in u.allowed_methods",
            lambda r, u, m: (
                f"{r.method} is not in {_key(u, 'allowed_methods')} "
                f"({', '.join(u.allowed_methods)})"
            ),
            "method",
        ),
        Rule(
            _body_field,
            "r.body is None or r.method not in BODILESS_METHODS",
            lambda r, u, m: (
                f"a {r.method} request carries no body (a body there could be read "
                "as a second request); use POST, PUT, PATCH or DELETE"
            ),
        ),
        Rule(
            "http.path",
            "len(r.path) <= m and (r.path.isascii() or len(r.path.encode()) <= m)",
            lambda r, u, m: f"{utf8_size(r.path)} bytes exceed server.max_path_bytes ({m})",
            "path",
        ),
        Rule(
            "http.path",
            # r.path.startswith('/') and not r.path.startswith('//'), in a third less time
            "r.path[:1] == '/' and r.path[1:2] != '/' and '\\\\' not in r.path",
            lambda r, u, m: 'must be a path starting with "/" (no scheme or host)',
            "path",
        ),
        Rule(
            "http.path",
            "PATH_STOPS.search(r.path) is None",  # one search, not three (measured)
            lambda r, u, m: "contains whitespace, control characters, ? or # (use query)",
            "path",
        ),
        Rule(
            "http.path",
            "('.' not in r.path and '%' not in r.path and ';' not in r.path and r.path.isascii())"
            " or path_problem(r.path) is None",
            lambda r, u, m: path_problem(r.path) or "",
            "path",
        ),
        Rule(
            "http.path",
            "not u.path_prefixes or path_allowed(r.path, u.path_prefixes)",
            lambda r, u, m: f"is outside {_key(u, 'path_prefixes')} ({', '.join(u.path_prefixes)})",
            "path",
        ),
        Rule(
            "http.query",
            "not r.query or query_bytes(r.query) <= m",
            lambda r, u, m: (
                f"{query_bytes(r.query)} bytes of names and values exceed "
                f"server.max_path_bytes ({m})"
            ),
        ),
        Rule(
            "http.body",
            "r.body is None or len(r.body) <= u.max_request_bytes",
            lambda r, u, m: (
                f"{len(r.body or b'')} bytes exceed {_key(u, 'max_request_bytes')} "
                f"({u.max_request_bytes})"
            ),
        ),
        *_pair_rules("r.headers"),
    ),
    _NAMES,
)
GRPC_RULES = Rules(
    "r, u, m",
    (
        Rule(
            "grpc.method",
            "len(r.method) <= m and (r.method.isascii() or len(r.method.encode()) <= m)",
            lambda r, u, m: f"{utf8_size(r.method)} bytes exceed server.max_path_bytes ({m})",
            "method",
        ),
        Rule(
            "grpc.method",
            "GRPC_METHOD.match(r.method) is not None",
            lambda r, u, m: "is not a full method name /package.Service/Method",
            "method",
        ),
        Rule(
            "grpc.method",
            "not u.allowed_methods or grpc_method_allowed(r.method, u.allowed_methods)",
            lambda r, u, m: (
                f"is not in {_key(u, 'allowed_methods')} ({', '.join(u.allowed_methods)})"
            ),
            "method",
        ),
        Rule(
            "grpc.request",
            "len(r.request) <= u.max_request_bytes",
            lambda r, u, m: (
                f"{len(r.request)} bytes exceed {_key(u, 'max_request_bytes')} "
                f"({u.max_request_bytes})"
            ),
        ),
        *_pair_rules("r.metadata"),
    ),
    _NAMES,
)
# Per header (name, value): names as an upstream reads them (case, _ for -).
HEADER_RULES = Rules(
    "name, value",
    (
        Rule(
            "http.headers",
            "name.lower().replace('_', '-') not in FRAMING_HEADERS",  # as canonical_header
            lambda name, value: f"{name!r} is a hop-by-hop or framing header and is never sent",
        ),
        Rule(
            lambda name, value: f"http.headers[{name!r}]",
            "header_value_problem(value) is None",
            lambda name, value: header_value_problem(value) or "",
        ),
    ),
    _NAMES,
)
METADATA_RULES = Rules(
    "key, value",
    (
        Rule(
            lambda key, value: f"grpc.metadata[{key!r}]",
            "header_value_problem(value, ascii_only=True) is None",
            lambda key, value: header_value_problem(value, ascii_only=True) or "",
        ),
    ),
    _NAMES,
)


def request_allowed(
    upstream: UpstreamConfig, request: HttpRequest | GrpcRequest, max_path_bytes: int
) -> bool:
    """Whether ``request`` keeps every rule: the tables walked, stopping at the first failure."""
    if isinstance(request, HttpRequest):
        if not HTTP_RULES.all_hold(request, upstream, max_path_bytes):
            return False
        entry_holds = HEADER_RULES.all_hold
        pairs = request.headers
    else:
        if not GRPC_RULES.all_hold(request, upstream, max_path_bytes):
            return False
        entry_holds = METADATA_RULES.all_hold
        pairs = request.metadata
    for name, value in pairs:  # noqa: SIM110 (a loop is faster on the hot path)
        if not entry_holds(name, value):
            return False
    return True


def request_problems(
    upstream: UpstreamConfig,
    request: HttpRequest | GrpcRequest,
    target: str | None,
    max_path_bytes: int,
) -> Iterator[Problem]:
    """Every rule ``request`` breaks (the same tables, walked whole)."""
    if isinstance(request, HttpRequest):
        rules, entry_rules = HTTP_RULES, HEADER_RULES
    else:
        rules, entry_rules = GRPC_RULES, METADATA_RULES
    yield from rules.broken(target, request, upstream, max_path_bytes)
    for name, value in pairs_of(request):
        yield from entry_rules.broken(target, name, value)
