"""Durations as people write them in config files and on the command line: ``250ms``, ``2s``,
``1m30s``. A bottom module: the config and the ``call`` command both read durations, and the
command must not import the whole config to do it."""

from __future__ import annotations

import math
import re

# One part: a number and its unit; a duration is one or more parts, largest unit first.
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)")
_SCALE = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_ORDER = tuple(_SCALE)
_LONGEST = 366 * 24 * 3600.0  # no duration here is meant to be longer; "9" * 400 is a typo


def parse_duration(text: str) -> float:
    """Seconds in a duration string: ``"250ms"`` -> 0.25, ``"2s"`` -> 2.0, ``"1m30s"`` -> 90.0.

    Compound forms name each unit at most once, largest first (``1h30m``, ``1m30s``, ``2s500ms``).
    """
    stripped = text.strip()
    seconds = 0.0
    position, last_unit = 0, -1
    while position < len(stripped):
        part = _PART.match(stripped, position)
        unit = _ORDER.index(part.group(2)) if part else -1
        if part is None or unit <= last_unit:
            raise ValueError(f"{text!r} is not a duration (use 250ms, 2s, 1m)")
        seconds += float(part.group(1)) * _SCALE[part.group(2)]
        position, last_unit = part.end(), unit
    if last_unit < 0:
        raise ValueError(f"{text!r} is not a duration (use 250ms, 2s, 1m)")
    if not math.isfinite(seconds) or seconds > _LONGEST:
        raise ValueError(f"{text!r} is longer than a year")
    return seconds
