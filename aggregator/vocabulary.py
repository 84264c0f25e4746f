"""Names every layer shares: id and key patterns, method sets and the header vocabulary.

The bottom of the package: it imports nothing of ours, and every module that needs one of these
names imports it from here, so a set is written once (docs/development.md, "Layers").
"""

from __future__ import annotations

import re

# Ids of targets, names of upstreams and named aggregates (docs/api.md, docs/configuration.md).
LONGEST_NAME = 64
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
# A named aggregate's parameter: no dots, as {{params.a.b}} reads b inside parameter a.
PARAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
# gRPC metadata keys as grpc accepts them (lowercase; "-bin" for bytes).
METADATA_KEY = re.compile(r"^[0-9a-z_.-]+\Z")
# An RFC 9110 token: what an HTTP header name may be.
TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# A full gRPC method name, /package.Service/Method.
GRPC_METHOD = re.compile(r"^/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*\Z")
# A method an upstream allows: a full name, or /package.Service/* for all of a service's.
GRPC_METHOD_PATTERN = re.compile(r"^/[A-Za-z_][A-Za-z0-9_.]*/(\*|[A-Za-z_][A-Za-z0-9_]*)\Z")
# Controls and space: never in a path, a name or a URL.
CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
# x-request-id as the server accepts it from a caller and the admin page links it.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")

# The HTTP methods callers may use and upstreams may allow (allowed_methods).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# These methods carry no body: one sent anyway may be read as a second request by an upstream
# that does not expect it (request smuggling), so a body on one is refused (docs/security.md).
BODILESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# What the transport never sends a body with: the bodiless methods and CONNECT.
NO_BODY_METHODS = BODILESS_METHODS | {"CONNECT"}
# Safe to send twice (retries, hedges): RFC 9110's idempotent methods.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

# Connection-level (hop-by-hop) and framing headers: the aggregator's connection decides them,
# and no configuration lets a caller set them.
FRAMING_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host",
        "content-length", "expect",
    }
)  # fmt: skip
# What the aggregator sets on every upstream request itself.
SET_BY_AGGREGATOR = frozenset({"content-type", "user-agent", "x-request-id"})
# Caller headers and metadata that are never copied to, or set for, an upstream.
UNFORWARDABLE = FRAMING_HEADERS | SET_BY_AGGREGATOR
# Names the aggregator writes: a look-alike (x_request_id) would reach an upstream that folds
# "_" into "-" as a second value.
OWN_HEADERS = SET_BY_AGGREGATOR | {"accept"}
# Headers that ask an upstream (or the proxy in front of it) to use another method or URL than
# the request line's, or that say who the client is. Refused by default; an upstream's
# ``allowed_headers`` admits one on purpose.
STEERING_HEADERS = frozenset(
    {
        "x-http-method-override", "x-http-method", "x-method-override",
        "x-original-url", "x-original-uri", "x-rewrite-url", "x-override-url",
        "forwarded", "via", "x-real-ip", "x-client-ip", "client-ip", "true-client-ip",
        "cf-connecting-ip", "fastly-client-ip", "x-cluster-client-ip", "x-originating-ip",
        "x-remote-ip", "x-remote-addr", "x-remote-user", "x-client-cert",
    }
)  # fmt: skip
STEERING_PREFIXES = (
    "x-forwarded-",  # -for, -host, -proto, -prefix, -uri, -client-cert (Envoy's XFCC), ...
    "x-auth-request-",  # oauth2-proxy
    "x-envoy-",
    "remote-",  # Authelia/Authentik forward auth: Remote-User, Remote-Groups
    "x-webauth-",
    "x-ssl-client-",
    "ssl-client-",
    "x-amzn-oidc-",
    "x-goog-authenticated-user-",
    "x-ms-client-principal",
)

# Where a named aggregate's parameters are referenced ({{params.name}}).
PARAMS = "params"
# What a for_each expansion's element is referenced as ({{item.name}}).
ITEM = "item"
# The aggregate label of a call that names no configured aggregate.
AD_HOC = "ad_hoc"

# The trailer of a non-OK status that says whose fault it is: a serialized google.rpc.Status.
STATUS_DETAILS = "grpc-status-details-bin"
