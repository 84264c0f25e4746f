"""What a caller may write into the fields of an upstream request: paths, header names, values.

An upstream, and any proxy in front of it, may read a request differently than the rules
that let it through: it may decode percent-escapes (sometimes twice), drop ``;params`` from a
segment (``/public/..;/admin``), read ``\\`` as ``/``, fold Unicode compatibility characters
(a fullwidth full stop, U+FF0E, into ``.``), read ``_`` in a header name as ``-``, and trust
headers saying who the client is or which method or URL it meant. So every reading of a path
is checked, and headers that re-route, re-method or re-identify a request are refused unless
an upstream's ``allowed_headers`` admits them. Both plan.py (the caller's fields) and
outbound.py (the final request, after substitution) use these checks, and nothing else
decides them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterator, Sequence
from urllib.parse import unquote

from aggregator.vocabulary import OWN_HEADERS, STEERING_HEADERS, STEERING_PREFIXES

# C0 controls but HTAB, DEL, the C1 controls, and the Unicode line and paragraph separators:
# header values go out as UTF-8, and a reader that decodes them as Latin-1 and splits lines
# the way Python's str.splitlines does would see a line break in U+0085 or U+2028.
_VALUE_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_U_ESCAPE = re.compile(r"%[uU]")
_DECODED_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Percent-decoding rounds whose result is checked; an escape left after them is refused.
_DECODINGS = 2


def header_value_problem(value: str, *, ascii_only: bool = False) -> str | None:
    """Why ``value`` may not be sent as a header (or metadata) value; None when it may.

    The one check for every value: set by the caller, substituted from a dependency, or
    forwarded from the caller's metadata. gRPC metadata (``ascii_only``) must be printable
    ASCII, which rules out every control character too.
    """
    if ascii_only:
        if _NOT_PRINTABLE_ASCII.search(value):
            return "value must be printable ASCII (no control characters)"
    elif _VALUE_CONTROL.search(value):
        return "value contains control characters (CR, LF, NUL...)"
    return None


def canonical_header(name: str) -> str:
    """The name as an upstream that ignores case and reads ``_`` as ``-`` sees it."""
    return name.lower().replace("_", "-")


def steering(canonical: str) -> bool:
    """Whether the header re-methods, re-routes or re-identifies a request."""
    return canonical in STEERING_HEADERS or canonical.startswith(STEERING_PREFIXES)


def header_name_problem(name: str, allowed: Collection[str], never: Collection[str]) -> str | None:
    """Why a caller may not set header ``name`` (None when it may). ``never``: names that no
    configuration admits; ``allowed``: the upstream's ``allowed_headers`` (lowercase)."""
    folded = name.lower()
    canonical = folded.replace("_", "-")
    if canonical in never:
        return "is a hop-by-hop, framing or reserved header and is never sent"
    if "_" in name and canonical in OWN_HEADERS:
        return f"is read as {canonical!r} (which the aggregator sets) where _ folds into -"
    if steering(canonical) and folded not in allowed:
        return (
            "re-routes, re-methods or re-identifies the request: refused unless the "
            "upstream's allowed_headers names it"
        )
    return None


def duplicate_names(names: Sequence[str]) -> Iterator[tuple[str, str]]:
    """Pairs of names an upstream would read as one header (case, ``_`` for ``-``)."""
    seen: dict[str, str] = {}
    for name in names:
        canonical = canonical_header(name)
        if canonical in seen:
            yield seen[canonical], name
        else:
            seen[canonical] = name


def path_problem(path: str) -> str | None:
    """Why an upstream might read ``path`` differently than its rules do; None when it can't.

    Every reading of the path (as sent, percent-decoded once and twice, and each Unicode-folded)
    must be free of ``.``/``..`` segments (also with ``;params`` dropped), backslashes and
    control characters; escapes must be UTF-8 (no overlong sequences) and not nested deeper.
    """
    try:
        forms = path_forms(path)
    except ValueError as exc:
        return str(exc)
    for form in forms:
        if "\\" in form:
            return "reads as a backslash, which some upstreams take for /"
        if _DECODED_CONTROL.search(form):
            return "decodes to control characters (%00, CR, LF...)"
        if _dot_segment(form):
            return "contains . or .. segments (percent-encoded, with ;params or folded included)"
    return None


def path_forms(path: str) -> list[str]:
    """``path`` as sent, percent-decoded once and twice, and Unicode-folded (NFKC) readings.
    Raises ValueError when an escape is not UTF-8 or is left after two decodings."""
    forms = [path]
    if "%" not in path and path.isascii():  # the common path: one reading
        return forms
    if _U_ESCAPE.search(path):
        raise ValueError("has %u escapes, which some upstreams decode (IIS)")
    current = path
    for _ in range(_DECODINGS):
        if "%" not in current or not _ESCAPE.search(current):
            break
        try:
            current = unquote(current, errors="strict")
        except UnicodeDecodeError:
            raise ValueError(
                "has percent-escapes that are not UTF-8 (overlong or broken sequences)"
            ) from None
        forms.append(current)
    else:
        if _ESCAPE.search(current):
            raise ValueError("is percent-encoded more than twice")
    for form in forms[:]:
        if not form.isascii():
            folded = unicodedata.normalize("NFKC", form)
            if folded != form:
                if folded.count("%") != form.count("%"):
                    raise ValueError("has Unicode characters that fold into %")
                forms.append(folded)
    return forms


def _dot_segment(form: str) -> bool:
    """Whether a segment of ``form`` reads as . or .. somewhere: a segment ends at ; (params),
    ? or # (a decoded reading cut there), and trailing spaces and dots are dropped by some
    readers (Windows, IIS), so ``..``, ``...``, ``.. `` and ``..?x`` all count."""
    if "." not in form:
        return False
    for segment in form.split("/"):
        cut = _SEGMENT_END.split(segment, 1)[0].rstrip(" ")
        if cut and not cut.strip("."):
            return True
    return False


_SEGMENT_END = re.compile("[;?#]")


def path_allowed(path: str, prefixes: Sequence[str]) -> bool:
    """Whether every reading of ``path`` lies under one of ``prefixes`` (so ``%2F`` or a
    fullwidth solidus cannot take it out). A prefix without a trailing / matches whole
    segments only. A path path_problem refuses is not allowed."""
    if "%" not in path and path.isascii():  # one reading (loops: this is the hot path)
        for prefix in prefixes:  # noqa: SIM110
            if _under(path, prefix):
                return True
        return False
    try:
        forms = path_forms(path)
    except ValueError:
        return False
    return any(all(_under(form, prefix) for form in forms) for prefix in prefixes)


def _under(path: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")
