"""What a host name is and which ones are this machine: one answer for the config's checks and
the admin page's Host check (docs/security.md, "The admin page answers only its own name")."""

from __future__ import annotations

import ipaddress


def bare_host(name: str) -> str:
    """``name`` as a Host header or an address names a host: no IPv6 brackets, no final dot,
    lower case."""
    return name.strip("[]").removesuffix(".").lower()


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bare host) names this machine only: localhost, a *.localhost name
    (RFC 6761) or a loopback address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
