r"""Logging to stdout as plain text or JSON lines (``server.log_format``).

Structured fields travel in ``extra={...}``; the JSON formatter writes them as keys, the text
formatter appends them as ``key=value`` (logfmt). Nothing secret is ever passed in: no header
values, no bodies.

Text that reaches a log line may come from callers and upstreams (an upstream's reason phrase,
a header name in an error sentence). The text formatter writes every character that is not
printable as an escape (``\x1b``, ``\u2028``), so nothing can move the terminal's cursor,
colour it, or start a line of its own; and it quotes a field's value holding a space, ``=``,
``"`` or ``\``, so a value cannot pass for more fields (``error="a b=c"``, not ``error=a b=c``).
The JSON formatter's ``json.dumps`` escapes the same characters.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Values whose text never needs quotes or escapes (exactly these types: a subclass may write
# itself otherwise).
_NUMBERS = frozenset((int, float, bool))
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


_EXTRA_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {}  # record attributes -> the extra ones


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's ``extra`` fields, in the order given.

    Which attributes are extra is worked out once per shape of record (the same log call
    makes the same attributes), not on every line: it was the formatter's largest cost."""
    attributes = vars(record)
    shape = tuple(attributes)
    extra = _EXTRA_KEYS.get(shape)
    if extra is None:
        if len(_EXTRA_KEYS) >= 256:  # shapes come from code, not data; bounded all the same
            _EXTRA_KEYS.clear()
        extra = _EXTRA_KEYS[shape] = tuple(key for key in shape if key not in _STANDARD)
    return {key: attributes[key] for key in extra}


def escaped(text: str) -> str:
    r"""``text`` with every character ``str.isprintable`` refuses (controls, line and paragraph
    separators, bidirectional overrides) written as ``\xNN``, ``\uNNNN`` or ``\UNNNNNNNN``."""
    if text.isprintable():  # the common case, at C speed
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def logfmt_value(value: Any) -> str:
    """A field's value as logfmt writes it: quoted when it is empty or holds a space, ``=``,
    ``"``, ``\\`` or anything unprintable; inside the quotes ``"`` and ``\\`` are escaped,
    then the unprintable (so a ``\\x1b`` read back is always an escape, never typed text)."""
    if type(value) in _NUMBERS:  # digits, a sign, a dot, e, inf or nan: nothing to quote
        return str(value)
    text = value if isinstance(value, str) else str(value)
    # Four `in` tests: ~0.2 us on a request id, where a regular expression took ~1 us.
    if (
        text
        and text.isprintable()
        and " " not in text
        and "=" not in text
        and '"' not in text
        and "\\" not in text
    ):
        return text
    return '"' + escaped(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


class _Clock:
    """A record's time as text, the date and time part formatted once a second (strftime and
    gmtime/localtime are most of a formatter's cost at one line per call)."""

    def __init__(self, layout: str, convert: Any) -> None:
        self._layout = layout
        self._convert = convert
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second = second
            self._text = time.strftime(self._layout, self._convert(created))
        return self._text


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": f"{self._clock(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``2026-11-23 14:02:11,042 INFO aggregator.server message key=value ...``"""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock("%Y-%m-%d %H:%M:%S", time.localtime)

    def format(self, record: logging.LogRecord) -> str:
        # One line a record: a newline inside the message is escaped like any control
        # character; tracebacks (our own code's) follow on lines of their own.
        message = escaped(record.getMessage().rstrip("\n"))
        text = (
            f"{self._clock(record.created)},{int(record.msecs):03d} {record.levelname} "
            f"{record.name} {message}"
        )
        fields = _fields(record)
        if fields:
            text += " " + " ".join(
                [f"{key}={logfmt_value(value)}" for key, value in fields.items()]
            )
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


def configure(log_format: str = "text", level: str = "info") -> None:
    # The logging HOWTO's "Optimization": our lines carry no caller, thread or process fields,
    # so the module need not walk the stack or ask for them on every record (one a call).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print every upstream request of the demo servers.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
