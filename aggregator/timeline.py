"""The timeline: an aggregate drawn for people, one bar per target on a shared time axis.

``aggregator call`` and ``aggregator demo`` both draw with it. On a terminal the chart is redrawn
in place as results arrive (targets still running grow a faint bar) and uses colour; anywhere
else (a pipe, a file, CI) it writes one plain line per result as it arrives, then the chart,
fixed width, without escape codes::

    target           outcome      answer     latency  tries cache  0      50     100    150 ms
    shipping         OK           gRPC 0     65.2 ms      1 -      █████████████
    pricing          OK           HTTP 200   95.3 ms      1 miss   ███████████████████
    reviews          OK fallback  HTTP 503   31.0 ms      1 -      ▓▓▓▓▓▓
                     ↳ upstream answered HTTP 503
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, field
from typing import Any, TextIO

from google.protobuf import any_pb2, json_format
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from aggregator.outcomes import CACHE_NAMES, outcome_name
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.vocabulary import STATUS_DETAILS

PLAIN_WIDTH = 100
_FOR_EACH_ID = re.compile(r"^(?P<base>.+)\[\d+\]\Z")
# Axis spans (x 10^k ms) and how many intervals divide each into round steps.
_NICE_SPANS = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
_INTERVALS = (4, 5, 3, 6, 2)
_ROUND_STEPS = (1.0, 2.0, 2.5, 5.0)

# ANSI SGR codes.
_GREEN, _YELLOW, _RED, _MAGENTA, _DIM, _BOLD = "32", "33", "31", "35", "2", "1"
_COLOURS = {
    pb.OUTCOME_OK: _GREEN,
    pb.OUTCOME_ERROR: _RED,
    pb.OUTCOME_TIMEOUT: _YELLOW,
    pb.OUTCOME_UNAVAILABLE: _RED,
    pb.OUTCOME_CIRCUIT_OPEN: _MAGENTA,
    pb.OUTCOME_REJECTED: _MAGENTA,
}


@dataclass(frozen=True, slots=True)
class Glyphs:
    ok: str
    fallback: str
    timeout: str
    failed: str
    not_run: str
    running: str
    arrow: str
    ellipsis: str


UNICODE = Glyphs("█", "▓", "░", "▒", "·", "╌", "↳", "…")
ASCII = Glyphs("#", "%", "~", "x", ".", "-", "->", "~")


@dataclass(frozen=True, slots=True)
class Style:
    """How to draw: colour (ANSI escapes) or not, block characters or ASCII, how wide."""

    colour: bool = False
    glyphs: Glyphs = UNICODE
    width: int = PLAIN_WIDTH

    @classmethod
    def for_stream(cls, stream: TextIO) -> Style:
        """Colour and the terminal's width on a TTY (unless NO_COLOR is set); plain otherwise."""
        tty = is_terminal(stream)
        colour = tty and not os.environ.get("NO_COLOR")
        width = max(72, shutil.get_terminal_size().columns - 1) if tty else PLAIN_WIDTH
        return cls(colour=colour, glyphs=_glyphs_for(stream), width=width)

    def paint(self, text: str, *codes: str) -> str:
        if not self.colour or not codes or not text:
            return text
        return f"\x1b[{';'.join(codes)}m{text}\x1b[0m"


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _glyphs_for(stream: TextIO) -> Glyphs:
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "".join(astuple(UNICODE)).encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return UNICODE


@dataclass(frozen=True, slots=True)
class Row:
    result: pb.TargetResult
    arrived: float  # seconds from sending the request to receiving this result

    @property
    def start(self) -> float:
        return self.result.start_offset.ToNanoseconds() / 1e9

    @property
    def end(self) -> float:
        return self.start + self.result.latency.ToNanoseconds() / 1e9


@dataclass(slots=True)
class Timeline:
    """The results of one aggregate so far, and the chart of them.

    ``targets`` (the request's) tell the chart what is still running and which kind of call
    each target is; results arrive with :meth:`add`, in completion order.
    """

    targets: Sequence[pb.Target] = ()
    style: Style = field(default_factory=Style)
    rows: list[Row] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<Timeline [{len(self.rows)} results, {len(self.pending())} pending]>"

    def add(self, result: pb.TargetResult, arrived: float) -> Row:
        row = Row(result, arrived)
        self.rows.append(row)
        return row

    def pending(self) -> list[pb.Target]:
        """Targets of the request with no result yet (a for_each target: no element yet)."""
        answered = {_base_id(row.result.id) for row in self.rows}
        return [target for target in self.targets if target.id not in answered]

    def chart(self, now: float | None = None) -> list[str]:
        """The chart's lines. With ``now`` (live), pending targets are drawn as running."""
        pending = self.pending() if now is not None else []
        layout = _Layout.fit(self, now, pending)
        lines = [layout.header()]
        for row in self.rows:
            lines.extend(layout.row(row, self._kind(row.result.id)))
        lines.extend(layout.running(target, now or 0.0) for target in pending)
        legend = self._legend()
        if legend:
            lines.append(legend)
        return lines

    def arrival_line(self, row: Row) -> str:
        """One line for a result the moment it arrives (plain output, before the chart)."""
        result, style = row.result, self.style
        outcome = style.paint(f"{_outcome_text(result):<12}", *_outcome_colour(result))
        return (
            f"+{_ms(row.arrived):>10}  {_fit(result.id, 24):<24} {outcome} "
            f"{_answer(result, self._kind(result.id)):<9} {_ms(_latency(result)):>10}"
        )

    def _kind(self, target_id: str) -> str:
        base = _base_id(target_id)
        kinds = {target.id: target.WhichOneof("call") or "" for target in self.targets}
        return kinds.get(target_id) or kinds.get(base, "")

    def _legend(self) -> str:
        used = {_glyph(row.result, self.style.glyphs) for row in self.rows}
        glyphs = self.style.glyphs
        names = (
            (glyphs.ok, "ok"),
            (glyphs.fallback, "fallback"),
            (glyphs.timeout, "timeout"),
            (glyphs.failed, "failed"),
            (glyphs.not_run, "not run"),
        )
        if used <= {glyphs.ok}:
            return ""
        return "legend: " + "  ".join(f"{glyph} {name}" for glyph, name in names if glyph in used)


class TimelineView:
    """Writes a timeline to ``out`` while an aggregate streams in.

    Live (a terminal): the chart is redrawn in place on every result and every :meth:`tick`.
    Otherwise: one line per result as it arrives, then the chart once :meth:`finish` is called.
    """

    def __init__(self, out: TextIO, timeline: Timeline, live: bool) -> None:
        self.timeline = timeline
        self.live = live
        self._out = out
        self._drawn = 0  # lines of the last live drawing, to move back over
        self._started = time.perf_counter()

    def __repr__(self) -> str:
        mode = "live" if self.live else "plain"
        return f"<TimelineView [{mode}, {self.elapsed():.3f}s] {self.timeline!r}>"

    def start(self) -> None:
        """Starts the clock: call it just before sending the request."""
        self._started = time.perf_counter()
        if self.live:
            self._out.write(_HIDE_CURSOR)
            self.tick()

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def add(self, result: pb.TargetResult) -> None:
        row = self.timeline.add(result, self.elapsed())
        if self.live:
            self.tick()
        else:
            self._write([self.timeline.arrival_line(row)])

    def tick(self) -> None:
        """Redraws the live chart (the clock moved); nothing when not live."""
        if not self.live:
            return
        lines = self.timeline.chart(now=self.elapsed())
        if len(lines) >= shutil.get_terminal_size().lines:
            self._stop_live()  # taller than the screen: cannot move back over it
            return
        self._redraw(lines)

    def finish(self) -> None:
        """The final chart (idempotent enough to call from ``finally``)."""
        lines = self.timeline.chart()
        if self.live:
            self._redraw(lines)
            self._stop_live()
        else:
            if self.timeline.rows:
                self._write(["", *lines])
            else:
                self._write(["(no results)"])

    def _redraw(self, lines: list[str]) -> None:
        back = f"\x1b[{self._drawn}F" if self._drawn else ""
        self._out.write(back + "\x1b[J")
        self._write(lines)
        self._drawn = len(lines)

    def _stop_live(self) -> None:
        self._out.write(_SHOW_CURSOR)
        self.live = False
        self._drawn = 0

    def _write(self, lines: list[str]) -> None:
        self._out.write("".join(f"{line}\n" for line in lines))
        self._out.flush()


_HIDE_CURSOR, _SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


@dataclass(frozen=True, slots=True)
class _Layout:
    """Column widths and the time axis of one drawing of the chart."""

    style: Style
    id_width: int
    bar_width: int
    span: float  # seconds the axis covers

    @classmethod
    def fit(cls, timeline: Timeline, now: float | None, pending: Sequence[pb.Target]) -> _Layout:
        ids = [row.result.id for row in timeline.rows] + [target.id for target in pending]
        id_width = min(24, max([6, *map(len, ids)]))
        fixed = id_width + _FIXED_WIDTH
        latest = max([now or 0.0, *(row.end for row in timeline.rows)])
        bar_width = max(12, timeline.style.width - fixed - _AXIS_TAIL)
        return cls(timeline.style, id_width, bar_width, nice(latest))

    def header(self) -> str:
        columns = (
            f"{'target':<{self.id_width}} {'outcome':<12} {'answer':<9} "
            f"{'latency':>9} {'tries':>5} {'cache':<5}  "
        )
        return self.style.paint(columns + axis(self.span, self.bar_width), _BOLD)

    def row(self, row: Row, kind: str) -> list[str]:
        result, style = row.result, self.style
        colour = _outcome_colour(result)
        cells = (
            f"{_fit(result.id, self.id_width):<{self.id_width}} "
            f"{style.paint(f'{_outcome_text(result):<12}', *colour)} "
            f"{_answer(result, kind):<9} {_ms(_latency(result)):>9} "
            f"{result.attempts:>5} {_cache(result.cache):<5}  "
        )
        bar = self._bar(row.start, row.end, _glyph(result, style.glyphs))
        lines = [cells + style.paint(bar, *colour)]
        if result.error:
            note = f"{' ' * self.id_width} {style.glyphs.arrow} {result.error}"
            lines.append(style.paint(_fit(note, style.width), _DIM))
        return lines

    def running(self, target: pb.Target, now: float) -> str:
        waiting = bool(target.depends_on)
        cells = (
            f"{_fit(target.id, self.id_width):<{self.id_width}} "
            f"{'waiting' if waiting else 'running':<12} {'':<9} {'':>9} {'':>5} {'':<5}  "
        )
        bar = "" if waiting else self._bar(0.0, now, self.style.glyphs.running)
        return self.style.paint(cells + bar, _DIM)

    def _bar(self, start: float, end: float, glyph: str) -> str:
        scale = self.bar_width / self.span
        first = min(self.bar_width - 1, round(start * scale))
        last = max(first + 1, min(self.bar_width, round(end * scale)))
        return " " * first + glyph * (last - first)


_FIXED_WIDTH = 1 + 12 + 1 + 9 + 1 + 9 + 1 + 5 + 1 + 5 + 2
_AXIS_TAIL = len("1000 ms") - 1


def nice(seconds: float) -> float:
    """The smallest round span (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 x 10^k ms, at least 10 ms)
    that covers ``seconds``."""
    ms = max(seconds * 1000, 10.0)
    exponent = math.floor(math.log10(ms))
    for step in (*_NICE_SPANS, 10.0):
        candidate = step * 10.0**exponent
        if candidate >= ms - 1e-9:
            return candidate / 1000
    raise AssertionError("unreachable")  # pragma: no cover


def axis(span: float, width: int) -> str:
    """Tick labels from 0 to ``span`` in round steps, each starting at its column; the unit
    after the last, which starts at column ``width`` (_AXIS_TAIL columns are kept for it)."""
    unit, scale = ("s", 1.0) if span >= 1 else ("ms", 1000.0)
    intervals = _intervals(span * scale, width)
    text = ""
    for i in range(intervals + 1):
        label = _number(span * scale * i / intervals) + (f" {unit}" if i == intervals else "")
        column = round(width * i / intervals)
        text = (text.ljust(column) if column > len(text) or not text else text + " ") + label
    return text


def _intervals(span: float, width: int) -> int:
    """How many intervals split ``span`` into round steps with room for their labels."""
    for intervals in _INTERVALS:
        step = span / intervals
        mantissa = step / 10.0 ** math.floor(math.log10(step))
        room = width / intervals > len(_number(span)) + 2
        if room and any(math.isclose(mantissa, round_step) for round_step in _ROUND_STEPS):
            return intervals
    return 1


def _number(value: float) -> str:
    return f"{round(value, 6):g}"


def _base_id(target_id: str) -> str:
    match = _FOR_EACH_ID.match(target_id)
    return match.group("base") if match else target_id


def _latency(result: pb.TargetResult) -> float:
    return result.latency.ToNanoseconds() / 1e9


def _ms(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    return f"{seconds * 1000:.1f} ms"


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _outcome_text(result: pb.TargetResult) -> str:
    if result.from_fallback:
        return "OK fallback"
    return outcome_name(result.outcome).upper()


def _cache(cache: int) -> str:
    return CACHE_NAMES.get(cache, "-") if cache else "-"


def _outcome_colour(result: pb.TargetResult) -> tuple[str, ...]:
    if result.from_fallback:
        return (_YELLOW,)
    return (_COLOURS.get(result.outcome, _DIM),)


def _glyph(result: pb.TargetResult, glyphs: Glyphs) -> str:
    if result.from_fallback:
        return glyphs.fallback
    if result.outcome == pb.OUTCOME_OK:
        return glyphs.ok
    if result.outcome == pb.OUTCOME_TIMEOUT:
        return glyphs.timeout
    if result.outcome in (pb.OUTCOME_SKIPPED, pb.OUTCOME_CANCELLED, pb.OUTCOME_UNSPECIFIED):
        return glyphs.not_run
    return glyphs.failed


def _answer(result: pb.TargetResult, kind: str) -> str:
    """What the upstream answered: ``HTTP 200``, ``gRPC 14``, or ``-`` when it did not.

    ``kind`` is "" when the request's targets are not known (a named aggregate's): an OK
    answer with no HTTP status and no fallback then came from a gRPC upstream."""
    if result.http_status:
        return f"HTTP {result.http_status}"
    grpc_ok = kind == "grpc" or (not kind and not result.from_fallback)
    if result.grpc_code or (grpc_ok and result.outcome == pb.OUTCOME_OK):
        return f"gRPC {result.grpc_code}"
    return "-"


def body_lines(rows: Sequence[Row], style: Style, limit: int = 0) -> list[str]:
    """Each result's value: its JSON (decoded, or a fallback), else its body as text or a size.

    ``limit`` cuts each value to that many characters (0: whole)."""
    width = max((len(row.result.id) for row in rows), default=0)
    lines = [style.paint("bodies:", _BOLD)]
    for row in rows:
        text = body_text(row.result)
        if limit and len(text) > limit:
            text = text[: limit - 1] + style.glyphs.ellipsis
        lines.append(f"  {row.result.id:<{width}}  {text}")
    return lines


def body_text(result: pb.TargetResult) -> str:
    """The result's value on one line: JSON, text, or the size of a binary body."""
    if result.HasField("json"):
        # Sorted: a protobuf Struct keeps no key order, so the order would change from run to run.
        value = _whole_numbers(json_format.MessageToDict(result.json))
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if not result.body:
        return "(empty)"
    try:
        text = result.body.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(result.body)} bytes>"
    if any(unicodedata.category(char) == "Cc" and char not in "\t\r\n" for char in text):
        return f"<{len(result.body)} bytes>"  # a protobuf message, most likely
    return " ".join(text.split())


def _whole_numbers(value: Any) -> Any:
    """JSON as protobuf's Value holds it (every number a double), with 17.0 shown as 17."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(item) for item in value]
    return value


def summary_lines(summary: pb.AggregateSummary) -> list[str]:
    """x-aggregate-summary-bin, decoded: its counts, then one line per failure it lists."""
    lines = [
        f"{summary.targets} targets: {summary.succeeded} succeeded, {summary.failed} failed, "
        f"{summary.timed_out} timed out, {summary.fallback} from fallback"
    ]
    width = max((len(failure.id) for failure in summary.failures), default=0)
    for failure in summary.failures:
        outcome = outcome_name(failure.outcome).upper()
        latency = _ms(failure.latency.ToNanoseconds() / 1e9)
        lines.append(f"{failure.id:<{width}}  {outcome:<12} {latency:>9}")
    if summary.failures_omitted:
        lines.append(f"+{summary.failures_omitted} more failures (see the stream)")
    return lines


def trailer_lines(trailers: Iterable[tuple[str, str | bytes]], style: Style) -> list[str]:
    """The trailing metadata, one key a line; -bin values decoded where known."""
    trailers = list(trailers)
    if not trailers:
        return ["trailers: (none)"]
    width = max(len(key) for key, _ in trailers)
    lines = ["trailers:"]
    for key, value in trailers:
        shown = _trailer_value(key, value)
        first = shown[0] or style.paint("(empty)", _DIM)
        lines.append(f"  {style.paint(key.ljust(width), _BOLD)}  {first}")
        lines.extend(f"  {' ' * width}    {more}" for more in shown[1:])
    return lines


def _trailer_value(key: str, value: str | bytes) -> list[str]:
    if isinstance(value, str):
        return [value]
    if key == STATUS_DETAILS:
        return [f"<{len(value)} bytes: google.rpc.Status, read under the status line>"]
    if key == "x-aggregate-summary-bin":
        summary = pb.AggregateSummary()
        try:
            summary.ParseFromString(value)
        except DecodeError:
            return [f"<{len(value)} bytes, not an AggregateSummary>"]
        return summary_lines(summary)
    return [f"<{len(value)} bytes>"]


def status_details_lines(trailers: Iterable[tuple[str, str | bytes]]) -> list[str]:
    """grpc-status-details-bin, read: one line per detail the server sent (ErrorInfo,
    BadRequest's violations, QuotaFailure, RetryInfo), e.g.
    ``ErrorInfo UPSTREAM_FAILED (aggregator): target=user upstream=users http_status=404``."""
    raw = next((value for key, value in trailers if key == STATUS_DETAILS), None)
    if not isinstance(raw, bytes):
        return []
    try:
        status = status_pb2.Status.FromString(raw)
    except DecodeError:
        return [f"{STATUS_DETAILS}: not a google.rpc.Status"]
    return [line for packed in status.details for line in _detail_lines(packed)]


def _detail_lines(packed: any_pb2.Any) -> list[str]:
    info, bad, quota, retry = (
        error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(),
        error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo(),
    )  # fmt: skip
    if packed.Unpack(info):
        pairs = " ".join(f"{key}={value}" for key, value in sorted(info.metadata.items()))
        return [f"ErrorInfo {info.reason} ({info.domain})" + (f": {pairs}" if pairs else "")]
    if packed.Unpack(bad):
        return [f"BadRequest {v.field or '-'}: {v.description}" for v in bad.field_violations]
    if packed.Unpack(quota):
        return [f"QuotaFailure {v.subject}: {v.description}" for v in quota.violations]
    if packed.Unpack(retry):
        return [f"RetryInfo: retry after {_ms(retry.retry_delay.ToNanoseconds() / 1e9)}"]
    return [packed.type_url.rpartition("/")[2]]


def status_line(code_name: str, details: str, elapsed: float, style: Style) -> str:
    """``status OK in 143.2 ms`` (green), or the code and the server's message (red)."""
    colour = _GREEN if code_name == "OK" else _RED
    text = f"status {style.paint(code_name, _BOLD, colour)} in {_ms(elapsed)}"
    return f"{text}: {details}" if details and code_name != "OK" else text
