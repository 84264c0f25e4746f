"""Logging to stdout as plain text or JSON lines (``server.log_format``).

Structured fields travel in ``extra={...}``; the JSON formatter writes them as keys, the text
formatter appends them as ``key=value``. Nothing secret is ever passed in: no header values,
no bodies.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

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
        text = (
            f"{self._clock(record.created)},{int(record.msecs):03d} {record.levelname} "
            f"{record.name} {record.getMessage()}"
        )
        fields = _fields(record)
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        if record.exc_info:
            text += ("" if text.endswith("\n") else "\n") + self.formatException(record.exc_info)
        if record.stack_info:
            text += ("" if text.endswith("\n") else "\n") + self.formatStack(record.stack_info)
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
