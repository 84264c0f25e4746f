"""`aggregator call` run as a real process against the real server and upstreams; the timeline
renderer it shares with `aggregator demo`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import sys
from pathlib import Path

import pytest
import trustme
from google.protobuf import duration_pb2

from aggregator import timeline
from aggregator.cli import main
from aggregator.timeline import ASCII, UNICODE, Style, Timeline, TimelineView
from aggregator.v1 import aggregator_pb2 as pb
from tests.e2e.test_tls import server_tls, write_ca, write_leaf

REQUEST_YAML = """
targets:
  - id: quick
    http: {upstream: rest, path: /delay/10}
    decode_json: true
  - id: broken
    http: {upstream: rest, path: /status/500}
  - id: sleepy
    http: {upstream: rest, path: /delay/3000}
    timeout: 0.3s
  - id: saved
    http: {upstream: dead, path: /x}
    fallback: {note: from the fallback}
  - id: echo
    grpc: {upstream: rpc, method: /test.Upstream/Echo, request: aGVsbG8=}
"""


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    return {**env, "PYTHONUTF8": "1", **extra}


async def run_call(
    *args: str, stdin: bytes | None = None, **env: str
) -> tuple[int | None, str, str]:
    """Runs `python -m aggregator call ARGS` while this test's loop keeps the server running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aggregator", "call", *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(**env),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(stdin), 30)
    return process.returncode, out.decode(), err.decode()


def trailer(out: str, key: str) -> str:
    line = next(line for line in out.splitlines() if line.strip().startswith(key))
    return line.strip().removeprefix(key).strip()


async def test_call_draws_every_target_then_status_and_trailers(start_server, tmp_path):
    aggregator, _ = await start_server()
    request = tmp_path / "request.yaml"
    request.write_text(REQUEST_YAML)

    code, out, err = await run_call("--address", f"127.0.0.1:{aggregator.port}", str(request))

    assert code == 0, err
    assert "\x1b" not in out  # not a terminal: no colour, no cursor movement
    chart = out[out.index("target ") : out.index("status ")]
    rows = {line.split()[0]: line for line in chart.splitlines()[1:] if line[:1].isalpha()}
    del rows["legend:"]
    assert set(rows) == {"quick", "broken", "sleepy", "saved", "echo"}
    assert rows["quick"].split()[1:4] == ["OK", "HTTP", "200"]
    assert rows["broken"].split()[1:4] == ["ERROR", "HTTP", "500"]
    assert rows["sleepy"].split()[1] == "TIMEOUT"
    assert rows["saved"].split()[1:3] == ["OK", "fallback"]
    assert rows["echo"].split()[1:4] == ["OK", "gRPC", "0"]
    assert "rest answered HTTP 500" in chart  # each failure's sentence under its row
    assert "status OK in " in out
    assert trailer(out, "x-aggregate-completed") == "false"
    assert trailer(out, "x-aggregate-succeeded") == "3"
    assert set(trailer(out, "x-aggregate-failed").split(",")) == {"broken", "sleepy"}
    assert trailer(out, "x-aggregate-timed-out") == "sleepy"
    assert trailer(out, "x-aggregate-fallback") == "saved"
    summary = trailer(out, "x-aggregate-summary-bin")
    assert summary == "5 targets: 3 succeeded, 2 failed, 1 timed out, 1 from fallback"
    assert out.index("x-aggregate-summary-bin") < out.index("sleepy  TIMEOUT")


async def test_results_are_printed_as_they_arrive_in_completion_order(start_server, tmp_path):
    aggregator, _ = await start_server()
    request = tmp_path / "request.yaml"
    request.write_text(REQUEST_YAML)

    _, out, _ = await run_call("--address", f"127.0.0.1:{aggregator.port}", str(request))

    arrivals = [line.split()[3] for line in out.splitlines() if line.startswith("+")]
    assert arrivals[-1] == "sleepy"  # the 0.3 s timeout is the last to end
    assert sorted(arrivals) == sorted(["quick", "broken", "sleepy", "saved", "echo"])


async def test_call_reads_proto3_json_from_stdin_and_sends_metadata(start_server, rest):
    aggregator, _ = await start_server()
    request = {
        "targets": [
            {"id": "a", "http": {"upstream": "rest", "path": "/echo", "query": {"q": "1"}}},
            {"id": "b", "http": {"upstream": "rest", "path": "/delay/5"}, "decodeJson": True},
        ]
    }

    code, out, err = await run_call(
        "--address", f"127.0.0.1:{aggregator.port}", "--timeout", "2s",
        "-H", "x-request-id=call-test-1", "--bodies", "-",
        stdin=json.dumps(request).encode(),
    )  # fmt: skip

    assert code == 0, err
    assert "(x-request-id call-test-1)" in out
    assert {r["headers"]["x-request-id"] for r in rest.recorder.requests} == {"call-test-1"}
    assert 1800 <= int(trailer(out, "x-aggregate-deadline-ms")) <= 2000  # --timeout was sent
    assert '  b  {"delay_ms": 5}' in out  # --bodies


async def test_a_failed_call_shows_its_status_and_exits_1(start_server, tmp_path):
    aggregator, _ = await start_server()
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps(
            {
                "targets": [
                    {"id": "must", "http": {"upstream": "rest", "path": "/status/503"},
                     "required": True},
                    {"id": "other", "http": {"upstream": "rest", "path": "/delay/2000"}},
                ]
            }
        )
    )  # fmt: skip

    code, out, _ = await run_call("--address", f"127.0.0.1:{aggregator.port}", str(request))

    assert code == 1
    assert "status UNAVAILABLE in " in out
    assert "must" in out.split("status UNAVAILABLE", 1)[1]  # the message names the target
    assert "x-aggregate-failed" in out


async def test_a_request_the_server_refuses_exits_1_with_its_reasons(start_server, tmp_path):
    aggregator, _ = await start_server()
    request = tmp_path / "request.yaml"
    request.write_text("targets: [{id: a, http: {upstream: nowhere, path: /x}}]\n")

    code, out, _ = await run_call("--address", f"127.0.0.1:{aggregator.port}", str(request))

    assert code == 1
    assert "status INVALID_ARGUMENT" in out
    assert "http.upstream: names no configured upstream" in out  # not the name (issue 23 #7)
    assert "no result for: a" in out


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read: No such file or directory"),
        ("", "empty"),
        ("targets: [unclosed\n", "not valid YAML"),
        ('{"targets": [', "not valid JSON"),
        ("- just\n- a list\n", "must be a mapping with a targets list, got list"),
        ("targetz: []\n", 'has no field named "targetz"'),
        ("targets: [{id: a, http: {upstream: rest}, timeout: soon}]\n", "Duration"),
        (  # the config's duration form, in a request: say which form a request needs
            "targets: [{id: a, http: {upstream: rest}, timeout: 100ms}]\n",
            "target 'a': timeout '100ms' is not a proto Duration: request durations are seconds"
            ' with an "s" suffix ("0.1s"',
        ),
    ],
)
def test_a_bad_request_file_is_refused_with_a_clear_error(tmp_path, capsys, content, problem):
    path = tmp_path / "request.yaml"
    if content is not None:
        path.write_text(content)

    code = main(["call", "--address", "127.0.0.1:1", str(path)])

    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""  # nothing was sent, nothing drawn
    assert err.startswith(f"aggregator call: {path}: ")
    assert problem in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--timeout", "soon"], "--timeout: 'soon' is not a duration"),
        (["--timeout", "0"], "--timeout: '0' must be longer than 0"),
        (["-H", "novalue"], "--metadata 'novalue': expected key=value"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "/nonexistent/ca.pem"], "--tls-ca /nonexistent/ca.pem: cannot read"),
    ],
)
def test_bad_options_are_refused(tmp_path, capsys, options, problem):
    path = tmp_path / "request.yaml"
    path.write_text("targets: [{id: a, http: {upstream: rest, path: /x}}]\n")

    assert main(["call", *options, str(path)]) == 2
    assert problem in capsys.readouterr().err


async def test_call_over_mtls(start_server, tmp_path):
    ca, clients = trustme.CA(), trustme.CA()
    aggregator, _ = await start_server(server={"tls": server_tls(tmp_path, ca, clients)})
    cert, key = write_leaf(tmp_path, clients.issue_cert("billing.internal"), "client")
    request = tmp_path / "request.yaml"
    request.write_text("targets: [{id: a, http: {upstream: rest, path: /echo}}]\n")
    address = f"127.0.0.1:{aggregator.port}"
    ca_file = write_ca(tmp_path, ca)

    code, out, _ = await run_call(
        "--address", address, "--tls-ca", ca_file, "--tls-cert", cert, "--tls-key", key,
        str(request),
    )  # fmt: skip
    refused, without_cert, _ = await run_call(
        "--address", address, "--tls-ca", ca_file, str(request)
    )

    assert code == 0
    assert "status OK" in out
    assert refused == 1
    assert "status UNAVAILABLE" in without_cert


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side of the pty is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def run_in_terminal(*args: str, **env: str) -> tuple[int | None, str]:
    """Runs `aggregator call` with a pseudo-terminal as its stdout."""
    controller, terminal = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aggregator", "call", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=terminal, stderr=asyncio.subprocess.PIPE,
        env=_env(COLUMNS="120", LINES="40", **env),
    )  # fmt: skip
    os.close(terminal)
    try:
        output = await asyncio.wait_for(asyncio.to_thread(_read_all, controller), 30)
    finally:
        os.close(controller)
    await process.wait()
    return process.returncode, output.decode()


async def test_on_a_terminal_the_chart_is_live_and_coloured(start_server, tmp_path):
    aggregator, _ = await start_server()
    request = tmp_path / "request.yaml"
    request.write_text(REQUEST_YAML)
    address = f"127.0.0.1:{aggregator.port}"

    code, screen = await run_in_terminal("--address", address, str(request))
    _, uncoloured = await run_in_terminal("--address", address, str(request), NO_COLOR="1")

    assert code == 0
    assert "\x1b[32m" in screen  # green OK
    assert "\x1b[31m" in screen  # red ERROR
    assert "\x1b[?25l" in screen  # cursor hidden while live
    assert "\x1b[?25h" in screen  # ... and shown again
    assert "F\x1b[J" in screen  # redrawn in place (cursor up, clear below)
    assert "running" in screen  # sleepy was drawn while still running
    assert not [line for line in screen.splitlines() if line.startswith("+ ")]  # no plain lines
    assert "\x1b[32m" not in uncoloured
    assert "\x1b[31m" not in uncoloured
    assert "F\x1b[J" in uncoloured  # still live: NO_COLOR is about colour only


async def test_demo_draws_with_the_same_timeline():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aggregator", "demo",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 30)
    text = out.decode()

    assert process.returncode == 0, err.decode()
    chart = text[text.index("target ") :]
    for target in ("catalog", "pricing", "inventory", "recommendations", "reviews", "shipping"):
        assert f"\n{target} " in chart
    assert "OK fallback" in chart
    assert " hit " in chart  # catalog came from the cache the warm-up filled
    assert "x-aggregate-fallback     reviews" in text
    assert "INFO" not in text  # the server's log lines do not interleave with the chart
    assert 'called by name: {"aggregate": "product_page", "params": {"sku": "A-1042"}}' in text


# The renderer on its own.


def result(
    target_id: str, start_ms: float, latency_ms: float, outcome: int = pb.OUTCOME_OK, **fields
) -> pb.TargetResult:
    def duration(ms: float) -> duration_pb2.Duration:
        value = duration_pb2.Duration()
        value.FromNanoseconds(int(ms * 1e6))
        return value

    return pb.TargetResult(
        id=target_id,
        outcome=outcome,  # type: ignore[arg-type]
        start_offset=duration(start_ms),
        latency=duration(latency_ms),
        attempts=1,
        **fields,
    )


@pytest.mark.parametrize(
    ("seconds", "span"),
    [(0.0, 0.01), (0.011, 0.012), (0.14, 0.15), (0.2, 0.2), (0.201, 0.25), (2.6, 3.0), (31, 40)],
)
def test_the_axis_span_is_the_next_round_value(seconds, span):
    assert timeline.nice(seconds) == pytest.approx(span)


@pytest.mark.parametrize(
    ("span", "labels"),
    [
        (0.15, ["0", "50", "100", "150", "ms"]),
        (0.25, ["0", "50", "100", "150", "200", "250", "ms"]),
        (3.0, ["0", "1", "2", "3", "s"]),
    ],
)
def test_axis_labels_are_round(span, labels):
    assert timeline.axis(span, 40).split() == labels


def test_bars_sit_on_the_time_axis():
    chart = Timeline(style=Style(width=100))
    chart.add(result("first", 0, 50), 0.05)
    chart.add(result("second", 50, 50), 0.1)

    header, first, second = chart.chart()
    bar_start = header.index("0 ")
    end_label = header.index("100 ms")
    assert first.index("█") == bar_start
    assert second.index("█") == first.rindex("█") + 1  # second starts where first ended
    assert second.rindex("█") == end_label - 1  # ... and ends at the axis' end


def test_failures_have_their_own_glyph_sentence_and_legend():
    chart = Timeline(style=Style(width=100, glyphs=ASCII))
    chart.add(result("ok", 0, 10), 0.01)
    chart.add(result("late", 0, 100, pb.OUTCOME_TIMEOUT, error="did not answer in time"), 0.1)
    chart.add(result("fell", 0, 20, pb.OUTCOME_OK, from_fallback=True), 0.1)

    lines = chart.chart()

    assert "#" in lines[1]
    assert "~" in lines[2]
    assert "->" in lines[3]
    assert "%" in lines[4]
    assert "did not answer in time" in lines[3]
    assert lines[-1] == "legend: # ok  % fallback  ~ timeout"


def test_glyphs_follow_the_streams_encoding():
    ascii_stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    utf8_stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    assert Style.for_stream(ascii_stream).glyphs == ASCII
    assert Style.for_stream(utf8_stream).glyphs == UNICODE
    assert not Style.for_stream(utf8_stream).colour  # not a terminal


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_view_redraws_in_place_and_shows_what_is_still_running():
    targets = [
        pb.Target(id="a", http=pb.HttpCall(upstream="u", path="/a")),
        pb.Target(id="b", http=pb.HttpCall(upstream="u", path="/b")),
        pb.Target(id="c", http=pb.HttpCall(upstream="u", path="/c"), depends_on=["a"]),
    ]
    screen = Terminal()
    view = TimelineView(screen, Timeline(targets, Style(colour=True)), live=True)

    view.start()
    first_drawing = screen.getvalue()
    view.add(result("a", 0, 5))
    view.finish()

    assert "running" in first_drawing
    assert "waiting" in first_drawing
    assert "\x1b[4F\x1b[J" in screen.getvalue()  # moved back over the header and 3 rows
    final = screen.getvalue().rsplit("\x1b[J", 1)[1]
    assert "running" not in final
    assert "waiting" not in final
    assert screen.getvalue().endswith("\x1b[?25h")
    assert repr(view.timeline) == "<Timeline [1 results, 2 pending]>"


def test_plain_view_writes_a_line_per_result_then_the_chart():
    out = io.StringIO()
    view = TimelineView(out, Timeline(style=Style()), live=False)
    view.start()
    view.add(result("a", 0, 5))
    view.add(result("b", 0, 7, pb.OUTCOME_ERROR, http_status=502))
    view.finish()

    lines = out.getvalue().splitlines()
    assert lines[0].startswith("+")
    assert lines[0].split()[3:5] == ["a", "OK"]
    assert lines[1].split()[3:7] == ["b", "ERROR", "HTTP", "502"]
    assert lines[2] == ""
    assert lines[3].startswith("target ")


def test_summary_trailer_is_decoded():
    summary = pb.AggregateSummary(targets=3, succeeded=1, failed=2, timed_out=1, failures_omitted=1)
    summary.failures.add(id="slow", outcome=pb.OUTCOME_TIMEOUT)
    lines = timeline.trailer_lines(
        [
            ("x-aggregate-failed", "slow,gone"),
            ("x-aggregate-summary-bin", summary.SerializeToString()),
        ],
        Style(),
    )
    assert lines[2].split(None, 1) == [
        "x-aggregate-summary-bin",
        "3 targets: 1 succeeded, 2 failed, 1 timed out, 0 from fallback",
    ]
    assert lines[3].split() == ["slow", "TIMEOUT", "0.0", "ms"]
    assert lines[4].strip() == "+1 more failures (see the stream)"


def test_request_files_accept_yaml_and_proto_json_names(tmp_path):
    from aggregator.client import load_request

    path = Path(tmp_path / "r.yaml")
    path.write_text("targets: [{id: a, http: {upstream: u, path: /x}, decodeJson: true}]")
    request = load_request(str(path))
    assert request.targets[0].decode_json
    assert load_request("-", io.StringIO('{"targets": [{"id": "b"}]}')).targets[0].id == "b"


NAMED = {
    "params": {"sku": {"required": True}, "count": {"default": 1}},
    "targets": [
        {"id": "quick", "http": {"upstream": "rest", "path": "/echo/{{params.sku}}"}},
        {"id": "sleepy", "http": {"upstream": "rest", "path": "/delay/{{params.count}}"}},
    ],
}


async def test_call_runs_a_named_aggregate_with_parameters(start_server, rest):
    aggregator, _ = await start_server(aggregates={"page": NAMED})
    address = f"127.0.0.1:{aggregator.port}"

    code, out, err = await run_call(
        "--address", address, "--aggregate", "page", "-p", "sku=A/1", "-p", "count:=300"
    )  # fmt: skip

    assert code == 0, err
    assert "aggregate 'page' to " in out
    arrivals = [line.split()[3] for line in out.splitlines() if line.startswith("+")]
    assert arrivals == ["quick", "sleepy"]
    assert sorted(seen["path"] for seen in rest.recorder.requests) == ["/delay/300", "/echo/A%2F1"]
    assert trailer(out, "x-aggregate-succeeded") == "2"

    code, screen = await run_in_terminal(
        "--address", address, "--aggregate", "page", "-p", "sku=B", "-p", "count:=300"
    )  # fmt: skip
    assert code == 0
    assert "running" in screen  # the ids came from ListAggregates: sleepy drawn while running

    code, out, _ = await run_call("--address", address, "--aggregate", "page")
    assert code == 1
    assert "params.sku: required by aggregate 'page'" in out


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--aggregate", "page", "-p", "novalue"], "expected KEY=VALUE"),
        (["--aggregate", "page", "-p", "n:=not json"], "not JSON after :="),
        (["--aggregate", "page", "-p", "a=1", "-p", "a=2"], "given twice"),
        (["-p", "a=1", "-"], "-p/--param fills the parameters of --aggregate"),
        (["--aggregate", "page", "-"], "a request file or --aggregate, not both"),
        ([], "or --aggregate NAME, is required"),
    ],
)
def test_bad_aggregate_options_are_refused(capsys, options, problem):
    assert main(["call", "--address", "127.0.0.1:1", *options]) == 2
    assert problem in capsys.readouterr().err


def test_a_named_aggregates_grpc_answer_reads_grpc_0():
    """Issue 22: a named aggregate's targets are known by id only, so the answer column infers
    the kind: an OK answer without an HTTP status (and no fallback) came from gRPC."""
    style = Style(width=100, glyphs=ASCII)
    unknown = Timeline((pb.Target(id="rpc"), pb.Target(id="page"), pb.Target(id="saved")), style)
    for row in (
        result("rpc", 0, 5),
        result("page", 0, 5, http_status=200),
        result("saved", 0, 5, from_fallback=True),
    ):
        unknown.add(row, 0.005)
    lines = {line.split()[0]: line for line in unknown.chart()[1:] if line.strip()}
    assert "gRPC 0" in lines["rpc"]
    assert "HTTP 200" in lines["page"]
    assert "gRPC" not in lines["saved"]


async def test_call_piped_into_a_reader_that_leaves_prints_no_traceback(start_server, tmp_path):
    """Issue 22: `aggregator call ... | head -1` ends without a BrokenPipeError traceback."""
    aggregator, _ = await start_server()
    request = tmp_path / "request.yaml"
    request.write_text(REQUEST_YAML)
    command = (
        f"{sys.executable} -m aggregator call --address 127.0.0.1:{aggregator.port} "
        f"{request} | head -c 10"
    )
    process = await asyncio.create_subprocess_shell(
        command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env()
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert len(out) == 10
    assert b"Traceback" not in err
    assert b"BrokenPipeError" not in err
