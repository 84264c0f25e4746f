"""What the HTTP/1.1 pool (http1.py) answers and raises: its response and its failures, which
upstreams/http.py maps to target outcomes at its edge."""

from __future__ import annotations

from dataclasses import dataclass


class ConnectTimeout(Exception):
    """No connection (TCP and, for https, TLS) within the connect timeout."""


class Disconnected(Exception):
    """The connection ended before the response did."""

    def __init__(self, answered: bool, cause: BaseException | None) -> None:
        super().__init__("answered" if answered else "not answered")
        self.answered = answered  # some of a response had arrived
        self.cause = cause


class BrokenResponse(Exception):
    """What arrived is not an HTTP/1.1 response (llhttp's words, or ours)."""


class Closed(Exception):
    """The pool was closed (the server is stopping) before or while the request ran."""


class TooLarge(Exception):
    """The response would have made us buffer more than the cap."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(what)
        self.status = status
        self.what = what


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    headers: dict[bytes, bytes]  # lowercase names, WANTED_HEADERS only
    body: bytes
