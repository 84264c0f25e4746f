"""The docs run as written: every fenced block of README.md and docs/*.md, against examples/.

- ```yaml / ```json blocks are configs (``aggregator check-config`` must say ok) or requests
  (parsed as an ``AggregateRequest`` and sent with ``aggregator call`` to the example server,
  which must answer OK);
- ```sh blocks run in bash from the repository's root, and ```python blocks in this venv's
  Python, with the example server up; each must exit 0;
- ```text, ```proto and the like are output or excerpts and are not run.

A comment line right before a fence changes that (docs/development.md lists them):
``<!-- docs-test: skip (why) -->``, ``<!-- docs-test: expect CODE -->`` (a request block whose
call ends with that status), ``<!-- docs-test: starts the example -->`` (the block this test
runs to start the example upstreams and server) and ``<!-- docs-test: is examples/FILE -->`` (a
block that shows that file). The example's addresses (127.0.0.1:50051, 9464, 8081, 8082) are
replaced by free ports, so the test never collides with a server someone left running.

The configuration tables are checked against the config code: every key of config/schema.py's
dataclasses is documented, with the default the parser applies.
"""

from __future__ import annotations

import dataclasses
import os
import re
import select
import shlex
import socket
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from aggregator import config as config_module
from aggregator.config import ConfigError, config_from_mapping, load_config, parse_duration
from aggregator.v1 import aggregator_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE_ADDRESSES = (
    "127.0.0.1:50051", "127.0.0.1:9464", "127.0.0.1:9465", "127.0.0.1:8081", "127.0.0.1:8082"
)  # fmt: skip
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARK = re.compile(r"^<!-- docs-test: (.+?) -->$")
_MARKS = re.compile(
    r"^(skip \(.+\)|expect [A-Z_]+|starts the example|is examples/\S+"
    r"|is the output of aggregator demo)$"
)
BUF = ".venv/node/node_modules/.bin/buf"
SHELLS = {"sh", "shell", "bash"}
RUN = SHELLS | {"yaml", "json", "python"}
NOT_RUN = {"text", "proto", ""}


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int
    language: str
    mark: str
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        """shell, python, config, request, or unknown."""
        if self.language in SHELLS:
            return "shell"
        if self.language == "python":
            return "python"
        document = yaml.safe_load(self.text)  # JSON is YAML
        if isinstance(document, dict) and "targets" in document:
            return "request"
        if isinstance(document, dict) and set(document) <= {
            "server",
            "upstreams",
            "auth",
            "tracing",
            "aggregates",
            "limits",
        }:
            return "config"
        return "unknown"


def blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if not fence:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        before = next((line for line in reversed(lines[:index]) if line.strip()), "")
        mark = _MARK.match(before)
        text = "\n".join(lines[index + 1 : end]) + "\n"
        yield Block(path, index + 1, fence.group(1), mark.group(1) if mark else "", text)
        index = end + 1


ALL = [block for path in DOCS for block in blocks(path)]


def runnable(*kinds: str) -> list[Any]:
    return [
        pytest.param(block, id=str(block))
        for block in ALL
        if block.language in RUN
        and not block.mark.startswith(("skip", "starts"))
        and block.kind in kinds
    ]


def test_every_block_is_known_and_every_mark_understood():
    assert len(ALL) > 20
    for block in ALL:
        assert block.language in RUN | NOT_RUN, (
            f"{block}: unknown fence language {block.language!r}"
        )
        assert not block.mark or _MARKS.match(block.mark), f"{block}: unknown mark {block.mark!r}"
        if block.language in RUN and not block.mark.startswith("skip"):
            assert block.kind != "unknown", f"{block}: neither a config nor a request: mark it"


@pytest.mark.parametrize("block", [b for b in ALL if b.mark.startswith("is examples/")], ids=str)
def test_blocks_that_show_an_example_file_show_it_as_it_is(block: Block):
    shown = ROOT / block.mark.removeprefix("is ")
    assert yaml.safe_load(block.text) == yaml.safe_load(shown.read_text(encoding="utf-8"))


# The example, started as the docs start it.


class Example:
    """The example's upstreams and server on free ports, and the substitutions that reach them."""

    def __init__(self, tmp: Path) -> None:
        ports = free_ports(len(EXAMPLE_ADDRESSES))
        self.addresses = {
            documented: f"127.0.0.1:{port}"
            for documented, port in zip(EXAMPLE_ADDRESSES, ports, strict=True)
        }
        self.config = tmp / "config.yaml"
        self.config.write_text(self.substitute((ROOT / "examples/config.yaml").read_text()))
        self.processes: list[subprocess.Popen[str]] = []
        self.first_lines: list[str] = []  # the line each process was waited for

    @property
    def address(self) -> str:
        return self.addresses["127.0.0.1:50051"]

    def substitute(self, text: str) -> str:
        for documented, actual in self.addresses.items():
            text = text.replace(documented, actual)
        return text.replace("examples/config.yaml", str(self.config))

    def start(self, block: Block, first_lines: tuple[str, ...]) -> None:
        commands = [_command(line) for line in block.text.splitlines() if line.strip()]
        for command, first_line in zip(commands, first_lines, strict=True):
            process = subprocess.Popen(
                shlex.split(self.substitute(command)),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            self.processes.append(process)
            self.first_lines.append(wait_for_line(process, first_line, timeout=20))

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            assert process.stdout is not None
            process.stdout.close()


def _command(line: str) -> str:
    """A line of a shell block without its comment and its trailing ``&``."""
    command = line.split("  #", 1)[0].strip()
    return command.removesuffix("&").strip()


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_line(process: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """Reads the process's output until a line contains ``prefix``; fails with what it said."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([process.stdout], [], [], left)
        if not ready:
            break
        line = process.stdout.readline()
        if not line:  # exited
            break
        seen.append(line)
        if prefix in line:
            return line
    raise AssertionError(f"no line with {prefix!r} from {process.args}: {''.join(seen)!r}")


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Example]:
    starts = [block for block in ALL if block.mark == "starts the example"]
    assert starts, "no block marked 'starts the example'"
    commands = {
        tuple(_command(line) for line in b.text.splitlines() if line.strip()) for b in starts
    }
    assert len(commands) == 1, f"the blocks that start the example differ: {commands}"
    running = Example(tmp_path_factory.mktemp("example"))
    try:
        running.start(starts[0], ("example upstreams:", "serving gRPC on"))
        yield running
    finally:
        running.stop()


def test_the_example_names_every_port_and_serves_metrics_without_created(example: Example):
    assert (
        example.first_lines[1]
        .rstrip()
        .endswith(
            f"serving gRPC on {example.address} (plaintext), health on the gRPC port, "
            f"metrics on http://{example.addresses['127.0.0.1:9464']}/metrics, "
            f"admin page on http://{example.addresses['127.0.0.1:9465']}/"
        )
    )
    url = f"http://{example.addresses['127.0.0.1:9464']}/metrics"
    text = run(["curl", "-sf", url]).stdout
    assert "aggregator_calls_total" in text
    assert "_created" not in text


# Configs and requests.


@pytest.mark.parametrize("block", runnable("config"))
def test_config_blocks_pass_check_config(block: Block, tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(block.text)
    try:
        load_config(str(path))
    except ConfigError as exc:
        pytest.fail(f"{block}: check-config says: {exc.problems}")


@pytest.mark.parametrize("block", runnable("request"))
def test_request_blocks_run_against_the_example(block: Block, example: Example, tmp_path: Path):
    json_format.ParseDict(yaml.safe_load(block.text), pb.AggregateRequest())  # as the docs say
    path = tmp_path / f"request.{block.language}"
    path.write_text(block.text)
    done = run(
        [sys.executable, "-m", "aggregator", "call", "--address", example.address, str(path)]
    )
    expected = block.mark.removeprefix("expect ") if block.mark.startswith("expect") else "OK"
    assert f"status {expected} " in done.stdout, f"{block}:\n{done.stdout}{done.stderr}"


# Commands.


@pytest.mark.parametrize("block", runnable("shell"))
def test_shell_blocks_run_as_written(block: Block, example: Example):
    if BUF in block.text and not (ROOT / BUF).exists():
        pytest.skip("buf not installed (npm @bufbuild/buf; make test installs it)")
    done = run(["bash", "-e", "-o", "pipefail", "-c", example.substitute(block.text)])
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("block", runnable("python"))
def test_python_blocks_run_as_written(block: Block, example: Example):
    done = run([sys.executable, "-c", example.substitute(block.text)])
    assert done.returncode == 0, f"{block} exited {done.returncode}:\n{done.stdout}{done.stderr}"


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=45, env=env)


# The configuration reference against the config code.

CONFIGURATION = ROOT / "docs" / "configuration.md"
SECTIONS = {
    "server": config_module.ServerConfig,
    "upstreams.<name>": config_module.UpstreamConfig,
    "auth": config_module.AuthConfig,
    "tracing": config_module.TracingConfig,
    "limits": config_module.LimitsConfig,
}
# Keys the parser requires although their dataclass field has a default, and a document
# without them whose problems must name them.
REQUIRED_BY_THE_PARSER = {
    "upstreams.<name>.url": {"upstreams": {"x": {"kind": "http"}}},
    "upstreams.<name>.address": {"upstreams": {"x": {"kind": "grpc"}}},
    "auth.callers.<name>.upstreams": {"auth": {"callers": {"x": {"certificate": "c"}}}},
}
# A document with every optional section present, so the parser fills in its defaults.
EVERY_SECTION = {
    "upstreams": {
        "x": {
            "kind": "http",
            "url": "https://127.0.0.1:1",
            "retry": {},
            "hedge": {"delay": "1s"},
            "circuit_breaker": {},
            "rate_limit": {"rate": 1, "burst": 1},
            "cache": {"ttl": "1s"},
            "tls": {},
        }
    },
    "tracing": {},
}


def documented_keys() -> dict[str, str]:
    """``section.key`` -> the default cell, from every table of docs/configuration.md."""
    keys: dict[str, str] = {}
    section = ""
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        if heading := re.match(r"^## `([^`]+)`", line):
            section = heading.group(1)
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if section in SECTIONS and len(cells) >= 3 and cells[0].startswith("`"):
            key = f"{section}.{cells[0].strip('`')}"
            assert key not in keys, f"{key} documented twice"
            keys[key] = cells[1]
    return keys


def code_keys(cls: type, prefix: str) -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Every key the config code has under ``prefix``, sub-sections included, with its field."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get("derived"):  # filled in by the reader (config/schema.py)
            continue
        key = f"{prefix}.{field.name}"
        inner = _section_type(hints[field.name])
        if inner is not None and _is_mapping(hints[field.name]):
            yield from code_keys(inner, f"{key}.<name>")
            continue
        yield key, field
        if inner is not None:
            yield from code_keys(inner, key)


def _section_type(hint: Any) -> type | None:
    for arg in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _is_mapping(hint: Any) -> bool:
    return typing.get_origin(hint) is not None and "Mapping" in str(typing.get_origin(hint))


def documented_default(cell: str) -> Any:
    """The value a default cell states: ``off`` is None, a code span is YAML (durations parsed)."""
    if cell == "off":
        return None
    span = re.match(r"^`([^`]*)`", cell)
    assert span, f"default cell {cell!r} is neither required, off nor a `value`"
    value = yaml.safe_load(span.group(1))
    if isinstance(value, str) and re.match(r"^\d+(\.\d+)?(ms|s|m|h)$", value):
        return parse_duration(value)
    if isinstance(value, list):
        return tuple(value)
    return "" if value is None else value


def parsed_value(key: str) -> Any:
    """What the parser makes of EVERY_SECTION at ``key``, for the sections it builds."""
    value: Any = config_from_mapping(EVERY_SECTION)
    for part in key.split("."):
        value = value["x"] if part == "<name>" else getattr(value, part)
    return value


def test_every_config_key_is_documented_and_nothing_else():
    documented = documented_keys()
    in_code = {
        key: field for section, cls in SECTIONS.items() for key, field in code_keys(cls, section)
    }
    assert set(documented) - set(in_code) == set(), "documented keys the code does not have"
    assert set(in_code) - set(documented) == set(), "keys of the code docs/configuration.md lacks"


@pytest.mark.parametrize("key", sorted(documented_keys()))
def test_documented_defaults_are_the_code_defaults(key: str):
    cell = documented_keys()[key]
    field = dict(item for section, cls in SECTIONS.items() for item in code_keys(cls, section))[key]
    has_default = field.default is not dataclasses.MISSING
    if cell.startswith("required"):
        if has_default:  # the parser insists: its problems name the key
            assert key in REQUIRED_BY_THE_PARSER, f"{key}: documented as required, has a default"
            with pytest.raises(ConfigError) as raised:
                config_from_mapping(REQUIRED_BY_THE_PARSER[key])
            path = key.replace("<name>", "x")
            assert any(p.startswith(f"{path}: required") for p in raised.value.problems)
        return
    assert has_default, f"{key}: documented with a default, the code requires it"
    stated = documented_default(cell)
    if isinstance(stated, dict) and dataclasses.is_dataclass(field.default):
        # A section on by default (outlier_detection): its defaults, written as a mapping.
        stated = type(field.default)(
            **{
                name: parse_duration(value) if isinstance(value, str) else value
                for name, value in stated.items()
            }
        )
    assert stated == field.default, (
        f"{key}: documented {cell}, the code's default {field.default!r}"
    )
    # The parser builds these sections from EVERY_SECTION (server.tls would need real files).
    parsed = key.startswith(
        ("server.", "upstreams.", "tracing.", "limits.")
    ) and not key.startswith("server.tls.")
    if stated is not None and parsed:
        assert parsed_value(key) == stated, f"{key}: the parser fills in something else"


# Links between the pages.

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``."""
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if heading := re.match(r"^#+ (.+)$", line):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            found.add(slug)
    return found


@pytest.mark.parametrize("page", DOCS, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_link_between_pages_reaches_its_file_and_heading(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    for link in _LINK.findall(text):
        if re.match(r"^[a-z]+:", link):
            continue  # https:, mailto:
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} names no file"
        if anchor:
            assert anchor in anchors(path), f"{page.name}: {link} names no heading of {path.name}"


def test_the_readme_stays_a_front_door():
    # The reference lives in docs/; the README says what this is, how to run it, and links.
    assert len((ROOT / "README.md").read_bytes()) < 15_000


# The demo's output as the README shows it: the same lines, whatever the timings.

_VARYING = re.compile(r"[0-9a-f]{32}|\d+(?:\.\d+)?|[█▓▒░]+| +")


def _shape(line: str) -> str:
    """A line with its numbers, request id, bars and runs of spaces made alike."""
    shape = _VARYING.sub(lambda match: " " if match.group().isspace() else "#", line).strip()
    return re.sub(r"#( #)+", "#", shape)  # an axis has as many labels as its span needs


def test_the_readmes_demo_output_is_what_the_demo_prints():
    shown = [block for block in ALL if block.mark == "is the output of aggregator demo"]
    assert len(shown) == 1
    printed = run([sys.executable, "-m", "aggregator", "demo"]).stdout
    # Sorted: on a loaded machine two results 15 ms apart may arrive in the other order.
    assert sorted(_shape(line) for line in shown[0].text.splitlines() if line.strip()) == sorted(
        _shape(line) for line in printed.splitlines() if line.strip()
    )
