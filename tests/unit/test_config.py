"""The YAML config of docs/configuration.md: defaults, the documented example, and one named
line per problem."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aggregator.config import (
    BreakerPolicy,
    CachePolicy,
    Config,
    ConfigError,
    HedgePolicy,
    RetryPolicy,
    ServerConfig,
    UpstreamRateLimit,
    config_from_mapping,
    load_config,
    parse_config,
    parse_duration,
)
from aggregator.load import load_mapping

# docs/configuration.md, verbatim.
SPEC_EXAMPLE = """\
server:
  address: "[::]:50051"          # gRPC
  metrics_address: "0.0.0.0:9464" # Prometheus /metrics over HTTP; "" disables
  workers: 1                      # processes sharing the port
  max_targets: 100
  max_concurrent_calls: 1000
  default_deadline: 5s
  max_deadline: 30s
  deadline_margin: 20ms
  deadline_margin_ratio: 0.05
  shutdown_grace: 10s
upstreams:
  catalog:
    kind: http                    # http | grpc
    url: http://127.0.0.1:8081    # http: base URL
    timeout: 500ms
    connect_timeout: 100ms
    max_concurrency: 100
    retry: {attempts: 3, backoff: 25ms, max_backoff: 250ms, budget: 0.2}
    hedge: {delay: 50ms}
    circuit_breaker: {fail_max: 5, reset_timeout: 30s}
    rate_limit: {rate: 200, burst: 50}
    cache: {ttl: 30s, stale_if_error: 5m}
  pricing:
    kind: grpc
    address: 127.0.0.1:50061      # grpc: host:port
    timeout: 300ms
"""

# A valid document with every section, for cases to spoil one key at a time.
BASE: dict[str, Any] = {
    "server": {"address": "127.0.0.1:50051", "max_targets": 10},
    "upstreams": {
        "catalog": {
            "kind": "http",
            "url": "http://127.0.0.1:8081",
            "retry": {"attempts": 3, "backoff": "25ms", "max_backoff": "250ms", "budget": 0.2},
            "hedge": {"delay": "50ms"},
            "circuit_breaker": {"fail_max": 5, "reset_timeout": "30s"},
            "rate_limit": {"rate": 200, "burst": 50},
            "cache": {"ttl": "30s", "stale_if_error": "5m"},
        },
        "pricing": {"kind": "grpc", "address": "127.0.0.1:50061"},
    },
}

DELETE = object()


def spoiled(**changes: Any) -> dict[str, Any]:
    """BASE with ``changes`` applied; keys are dotted paths ("upstreams.catalog.retry.backoff")
    written with "__" for ".", and DELETE removes the key."""
    document = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        section = document
        for parent in parents:
            section = section.setdefault(parent, {})
        if value is DELETE:
            del section[key]
        else:
            section[key] = value
    return document


def problems_of(document: Any) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        config_from_mapping(document)
    return raised.value.problems


def key_paths(problems: list[str]) -> list[str]:
    return [problem.split(": ", 1)[0] for problem in problems]


def test_base_document_is_valid():
    config = config_from_mapping(BASE)
    assert set(config.upstreams) == {"catalog", "pricing"}


# Defaults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "{}", "server:\nupstreams:\n", "server: {}\nupstreams: {}\n"])
def test_empty_config_gets_the_spec_defaults(text):
    server = parse_config(text).server
    assert server.address == "[::]:50051"
    assert server.metrics_address == "0.0.0.0:9464"
    assert server.workers == 1
    assert server.max_targets == 100
    assert server.max_concurrent_calls == 1000
    assert server.default_deadline == 5.0
    assert server.max_deadline == 30.0
    assert server.deadline_margin == pytest.approx(0.020)
    assert server.deadline_margin_ratio == pytest.approx(0.05)
    assert server.shutdown_grace == 10.0
    assert parse_config(text).upstreams == {}


def test_an_absent_key_keeps_its_default_beside_present_ones():
    server = parse_config("server: {workers: 4, max_deadline: 1m}").server
    assert (server.workers, server.max_deadline) == (4, 60.0)
    assert server.max_targets == 100
    assert server.default_deadline == 5.0


@pytest.mark.parametrize(
    "upstream",
    [{"kind": "http", "url": "http://127.0.0.1:8081"}, {"kind": "grpc", "address": "h:1"}],
    ids=["http", "grpc"],
)
def test_unconfigured_policies_are_off_and_limits_conservative(upstream):
    (config,) = config_from_mapping({"upstreams": {"u": upstream}}).upstreams.values()
    assert config.name == "u"
    assert config.retry is None
    assert config.hedge is None
    assert config.circuit_breaker is None
    assert config.rate_limit is None
    assert config.cache is None
    assert 0 < config.connect_timeout <= config.timeout <= 30
    assert config.max_concurrency >= 1


def test_empty_policy_sections_take_the_policy_defaults():
    upstream = config_from_mapping(
        {
            "upstreams": {
                "u": {"kind": "http", "url": "http://h", "retry": {}, "circuit_breaker": {}}
            }
        }
    ).upstreams["u"]
    assert upstream.retry == RetryPolicy()
    assert upstream.circuit_breaker == BreakerPolicy()


def test_the_spec_example_parses_to_what_it_says():
    config = parse_config(SPEC_EXAMPLE)
    assert config.server == ServerConfig(
        address="[::]:50051",
        metrics_address="0.0.0.0:9464",
        workers=1,
        max_targets=100,
        max_concurrent_calls=1000,
        default_deadline=5.0,
        max_deadline=30.0,
        deadline_margin=0.020,
        deadline_margin_ratio=0.05,
        shutdown_grace=10.0,
    )
    catalog, pricing = config.upstreams["catalog"], config.upstreams["pricing"]
    assert (catalog.kind, catalog.url) == ("http", "http://127.0.0.1:8081")
    assert (catalog.timeout, catalog.connect_timeout, catalog.max_concurrency) == (0.5, 0.1, 100)
    assert catalog.retry == RetryPolicy(attempts=3, backoff=0.025, max_backoff=0.25, budget=0.2)
    assert catalog.hedge == HedgePolicy(delay=0.05)
    assert catalog.circuit_breaker == BreakerPolicy(fail_max=5, reset_timeout=30.0)
    assert catalog.rate_limit == UpstreamRateLimit(rate=200, burst=50)
    assert catalog.cache == CachePolicy(ttl=30.0, stale_if_error=300.0)
    assert (pricing.kind, pricing.address, pricing.timeout) == ("grpc", "127.0.0.1:50061", 0.3)
    assert pricing.url == ""


def test_base_url_loses_its_trailing_slash():
    config = config_from_mapping({"upstreams": {"u": {"kind": "http", "url": "http://h/api/"}}})
    assert config.upstreams["u"].url == "http://h/api"


def test_metrics_address_may_be_empty_to_disable_metrics():
    assert parse_config('server: {metrics_address: ""}').server.metrics_address == ""


# Durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), ("0ms", 0.0)],
)
def test_duration_strings(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10 sec", "5", "", "ms", "1 minute", "-1s", "1e3ms", "1s2", "s1"])
def test_bad_duration_strings(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("10 sec", "'10 sec' is not a duration"),
        (5, "5 is not a duration"),
        (0.5, "0.5 is not a duration"),
        ("0ms", "must be longer than 0"),
        (True, "True is not a duration"),
    ],
)
def test_bad_duration_names_its_key_path(value, words):
    problems = problems_of(spoiled(upstreams__catalog__retry__backoff=value))
    assert len(problems) == 1
    assert problems[0].startswith("upstreams.catalog.retry.backoff: ")
    assert words in problems[0]


# One line per bad value, naming its key path ------------------------------------------------

BAD_VALUES: list[tuple[dict[str, Any], list[str]]] = [
    # server
    ({"server__address": "nonsense"}, ["server.address"]),
    ({"server__address": 50051}, ["server.address"]),
    ({"server__address": "127.0.0.1:70000"}, ["server.address"]),
    ({"server__metrics_address": "9464"}, ["server.metrics_address"]),
    ({"server__workers": 0}, ["server.workers"]),
    ({"server__workers": "two"}, ["server.workers"]),
    ({"server__max_targets": 0}, ["server.max_targets"]),
    ({"server__max_targets": 1.5}, ["server.max_targets"]),
    ({"server__max_targets": True}, ["server.max_targets"]),
    ({"server__max_concurrent_calls": -1}, ["server.max_concurrent_calls"]),
    ({"server__default_deadline": "5"}, ["server.default_deadline"]),
    ({"server__default_deadline": 5}, ["server.default_deadline"]),
    ({"server__default_deadline": "0s"}, ["server.default_deadline"]),
    ({"server__default_deadline": "1m"}, ["server.default_deadline"]),  # > max_deadline 30s
    ({"server__max_deadline": "10 sec"}, ["server.max_deadline"]),
    ({"server__deadline_margin": "soon"}, ["server.deadline_margin"]),
    ({"server__deadline_margin_ratio": 0.9}, ["server.deadline_margin_ratio"]),
    ({"server__deadline_margin_ratio": -0.1}, ["server.deadline_margin_ratio"]),
    ({"server__deadline_margin_ratio": "5%"}, ["server.deadline_margin_ratio"]),
    ({"server__shutdown_grace": 10}, ["server.shutdown_grace"]),
    # an upstream
    ({"upstreams__catalog__timeout": "500"}, ["upstreams.catalog.timeout"]),
    ({"upstreams__catalog__timeout": "0ms"}, ["upstreams.catalog.timeout"]),
    ({"upstreams__catalog__connect_timeout": 1}, ["upstreams.catalog.connect_timeout"]),
    ({"upstreams__catalog__max_concurrency": 0}, ["upstreams.catalog.max_concurrency"]),
    ({"upstreams__pricing__timeout": "300 ms please"}, ["upstreams.pricing.timeout"]),
    # its policies
    ({"upstreams__catalog__retry": 3}, ["upstreams.catalog.retry"]),
    ({"upstreams__catalog__retry__attempts": 0}, ["upstreams.catalog.retry.attempts"]),
    ({"upstreams__catalog__retry__max_backoff": 5}, ["upstreams.catalog.retry.max_backoff"]),
    ({"upstreams__catalog__retry__max_backoff": "1ms"}, ["upstreams.catalog.retry.max_backoff"]),
    ({"upstreams__catalog__retry__budget": 1.5}, ["upstreams.catalog.retry.budget"]),
    ({"upstreams__catalog__hedge__delay": DELETE}, ["upstreams.catalog.hedge.delay"]),
    ({"upstreams__catalog__hedge__delay": "0s"}, ["upstreams.catalog.hedge.delay"]),
    (
        {"upstreams__catalog__hedge": "50ms"},
        ["upstreams.catalog.hedge", "upstreams.catalog.hedge.delay"],
    ),
    (
        {"upstreams__catalog__circuit_breaker__fail_max": 0},
        ["upstreams.catalog.circuit_breaker.fail_max"],
    ),
    (
        {"upstreams__catalog__circuit_breaker__reset_timeout": "later"},
        ["upstreams.catalog.circuit_breaker.reset_timeout"],
    ),
    ({"upstreams__catalog__rate_limit__rate": 0}, ["upstreams.catalog.rate_limit.rate"]),
    ({"upstreams__catalog__rate_limit__burst": DELETE}, ["upstreams.catalog.rate_limit.burst"]),
    ({"upstreams__catalog__rate_limit__burst": 0.5}, ["upstreams.catalog.rate_limit.burst"]),
    ({"upstreams__catalog__cache__ttl": DELETE}, ["upstreams.catalog.cache.ttl"]),
    ({"upstreams__catalog__cache__ttl": "0s"}, ["upstreams.catalog.cache.ttl"]),
    ({"upstreams__catalog__cache__stale_if_error": 5}, ["upstreams.catalog.cache.stale_if_error"]),
    # kind and endpoint
    ({"upstreams__catalog__kind": "soap"}, ["upstreams.catalog.kind"]),
    ({"upstreams__catalog__kind": DELETE}, ["upstreams.catalog.kind"]),
    ({"upstreams__catalog__url": DELETE}, ["upstreams.catalog.url"]),
    ({"upstreams__pricing__address": DELETE}, ["upstreams.pricing.address"]),
    ({"upstreams__catalog__address": "h:1"}, ["upstreams.catalog.address"]),
    ({"upstreams__pricing__url": "http://h"}, ["upstreams.pricing.url"]),
    ({"upstreams__catalog__url": "http://127.0.0.1:8081/?debug=1"}, ["upstreams.catalog.url"]),
    ({"upstreams__catalog__url": "http://127.0.0.1:8081/#top"}, ["upstreams.catalog.url"]),
    ({"upstreams__catalog__url": "http://user:pw@127.0.0.1:8081"}, ["upstreams.catalog.url"]),
    ({"upstreams__catalog__url": "ftp://127.0.0.1/"}, ["upstreams.catalog.url"]),
    ({"upstreams__catalog__url": "file:///etc/passwd"}, ["upstreams.catalog.url"]),
    ({"upstreams__catalog__url": "127.0.0.1:8081"}, ["upstreams.catalog.url"]),
    ({"upstreams__catalog__url": "http://"}, ["upstreams.catalog.url"]),
    ({"upstreams__catalog__url": "http://127.0.0.1:port"}, ["upstreams.catalog.url"]),
    ({"upstreams__catalog__url": "http://127.0.0.1:99999"}, ["upstreams.catalog.url"]),
    ({"upstreams__catalog__url": 8081}, ["upstreams.catalog.url"]),
    ({"upstreams__pricing__address": "localhost"}, ["upstreams.pricing.address"]),
    ({"upstreams__pricing__address": "127.0.0.1:99999"}, ["upstreams.pricing.address"]),
    ({"upstreams__pricing__address": 50061}, ["upstreams.pricing.address"]),
    ({"upstreams__bad name": {"kind": "grpc", "address": "h:1"}}, ["upstreams.bad name"]),
    # unknown keys, wherever they are
    ({"servers": {}}, ["servers"]),
    ({"server__port": 50051}, ["server.port"]),
    ({"upstreams__catalog__retries": 3}, ["upstreams.catalog.retries"]),
    ({"upstreams__catalog__name": "other"}, ["upstreams.catalog.name"]),
    ({"upstreams__catalog__retry__attempt": 3}, ["upstreams.catalog.retry.attempt"]),
    ({"upstreams__catalog__hedge__max": 2}, ["upstreams.catalog.hedge.max"]),
    (
        {"upstreams__catalog__circuit_breaker__threshold": 2},
        ["upstreams.catalog.circuit_breaker.threshold"],
    ),
    ({"upstreams__catalog__rate_limit__per": "1s"}, ["upstreams.catalog.rate_limit.per"]),
    ({"upstreams__catalog__cache__size": 10}, ["upstreams.catalog.cache.size"]),
    # wrong kind of value for a section
    ({"server": ["address"]}, ["server"]),
    ({"server": "127.0.0.1:50051"}, ["server"]),
    ({"upstreams": ["catalog"]}, ["upstreams"]),
    (
        {"upstreams__catalog": "http://127.0.0.1:8081"},
        ["upstreams.catalog", "upstreams.catalog.kind"],
    ),
]


def case_id(changes: dict[str, Any]) -> str:
    return " ".join(
        f"{key.replace('__', '.')}={'(deleted)' if value is DELETE else repr(value)}"
        for key, value in changes.items()
    )


@pytest.mark.parametrize(
    ("changes", "paths"),
    BAD_VALUES,
    ids=[case_id(changes) for changes, _ in BAD_VALUES],
)
def test_bad_value_is_one_line_naming_its_key_path(changes, paths):
    problems = problems_of(spoiled(**changes))
    assert key_paths(problems) == paths
    assert all("\n" not in problem for problem in problems)


@pytest.mark.parametrize("document", [[], "server: {}", 42], ids=["list", "string", "number"])
def test_top_level_must_be_a_mapping(document):
    problems = problems_of(document)
    assert len(problems) == 1
    assert "must be a mapping" in problems[0]


def test_bad_value_line_names_the_value_too():
    (problem,) = problems_of(spoiled(upstreams__catalog__url="ftp://127.0.0.1/"))
    assert "'ftp://127.0.0.1/'" in problem


def test_every_problem_is_reported_at_once_one_line_each():
    document = spoiled(
        server__workers=0,
        server__default_deadline="5 seconds",
        servers={},
        upstreams__catalog__retry__backoff="10 sec",
        upstreams__catalog__url="http://127.0.0.1:8081/?q=1",
        upstreams__pricing__address=DELETE,
    )
    with pytest.raises(ConfigError) as raised:
        config_from_mapping(document)
    problems = raised.value.problems
    assert sorted(key_paths(problems)) == sorted(
        [
            "server.workers",
            "server.default_deadline",
            "servers",
            "upstreams.catalog.retry.backoff",
            "upstreams.catalog.url",
            "upstreams.pricing.address",
        ]
    )
    assert str(raised.value).splitlines() == problems


# Files --------------------------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path):
    path = tmp_path / "aggregator.yaml"
    path.write_text(SPEC_EXAMPLE, encoding="utf-8")
    assert load_config(path) == parse_config(SPEC_EXAMPLE)
    assert isinstance(load_config(str(path)), Config)


@pytest.mark.parametrize(
    "text",
    ["server: [unclosed", "server:\n  address: x\n\taddress: y\n", "a: b: c", "upstreams: {x: }}"],
    ids=["unclosed", "tab", "nested-colon", "extra-brace"],
)
def test_invalid_yaml_is_one_line_naming_the_file(tmp_path: Path, text):
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{path}: ")
    assert "not valid YAML" in problem
    assert "\n" not in problem


def test_missing_file_is_one_line_naming_it(tmp_path: Path):
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_directory_is_not_a_config_file(tmp_path: Path):
    with pytest.raises(ConfigError) as raised:
        load_config(tmp_path)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{tmp_path}: cannot read")


def test_file_that_is_not_utf8_text_is_a_problem_not_a_crash(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes('server: {address: "caf\xe9:1"}\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (problem,) = raised.value.problems
    assert problem.startswith(f"{path}: ")


# aggregator check-config --------------------------------------------------------------------


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aggregator", "check-config", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_config_console_script_says_ok_for_the_spec_example(tmp_path: Path):
    path = tmp_path / "aggregator.yaml"
    path.write_text(SPEC_EXAMPLE, encoding="utf-8")
    script = Path(sys.executable).with_name("aggregator")
    done = subprocess.run(
        [str(script), "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_check_config_prints_every_problem_and_exits_1(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "server:\n  workers: 0\n  max_deadline: 10 sec\n"
        "upstreams:\n  catalog:\n    kind: http\n    url: ftp://x\n"
        "    retry: {backoff: 5}\n  pricing:\n    kind: grpc\n",
        encoding="utf-8",
    )
    done = check_config(str(path))
    assert done.returncode == 1
    assert "ok" not in done.stdout.splitlines()
    assert sorted(key_paths(done.stdout.splitlines())) == sorted(
        [
            "server.workers",
            "server.max_deadline",
            "upstreams.catalog.url",
            "upstreams.catalog.retry.backoff",
            "upstreams.pricing.address",
        ]
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "content",
    [
        None,
        b"server: [unclosed\n",
        b"upstreams: {x: {kind: http}}\n",
        b'server: {address: "caf\xe9:1"}\n',
    ],
    ids=["missing", "invalid-yaml", "missing-url", "not-utf8"],
)
def test_check_config_refuses_a_bad_file_in_one_line(tmp_path: Path, content):
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_bytes(content)
    done = check_config(str(path))
    assert done.returncode == 1
    assert len(done.stdout.splitlines()) == 1
    assert done.stdout != "ok\n"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "text", ["address: !!bool maybe", "address: !!timestamp x", "a: !!int zz", "a: !!float q"]
)
def test_yaml_that_pyyaml_cannot_build_is_one_clean_problem(text):
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="bad.yaml")
    (problem,) = raised.value.problems
    assert problem.startswith("bad.yaml: not valid YAML: ")
    assert "\n" not in problem


# An upstream is a fleet (docs/fleet.md) ----------------------------------------------------

FLEET_PROBLEMS = [
    ({"upstreams__catalog__url": []}, "upstreams.catalog.url", "empty list"),
    (
        {"upstreams__catalog__url": ["http://10.0.0.1:80", "https://10.0.0.2:80"]},
        "upstreams.catalog.url",
        "mixes schemes",
    ),
    (
        {"upstreams__catalog__url": ["http://10.0.0.1:80/a", "http://10.0.0.2:80/b"]},
        "upstreams.catalog.url",
        "another path",
    ),
    (
        {"upstreams__catalog__url": ["http://10.0.0.1", "10.0.0.2:80"]},
        "upstreams.catalog.url",
        "entry 1",
    ),
    (
        {"upstreams__pricing__address": ["10.0.0.7:50061", "pod"]},
        "upstreams.pricing.address",
        "entry 1",
    ),
    ({"upstreams__pricing__address": []}, "upstreams.pricing.address", "empty list"),
    ({"upstreams__catalog__max_concurrency": "lots"}, "upstreams.catalog.max_concurrency", "auto"),
    (
        {"upstreams__catalog__max_concurrency": "auto", "upstreams__catalog__adaptive_max": 0},
        "upstreams.catalog.adaptive_max",
        "at least 1",
    ),
    ({"upstreams__catalog__balancer": "random"}, "upstreams.catalog.balancer", "least_request"),
    ({"upstreams__catalog__resolve_interval": "0s"}, "upstreams.catalog.resolve_interval", "0"),
    (
        {"upstreams__catalog__outlier_detection__max_ejection_percent": 101},
        "upstreams.catalog.outlier_detection.max_ejection_percent",
        "101",
    ),
    (
        {"upstreams__catalog__outlier_detection__consecutive_failures": 0},
        "upstreams.catalog.outlier_detection.consecutive_failures",
        "0",
    ),
    (
        {"upstreams__catalog__outlier_detection__interval": "1s"},
        "upstreams.catalog.outlier_detection.interval",
        "",
    ),
]


@pytest.mark.parametrize(("changes", "path", "words"), FLEET_PROBLEMS)
def test_fleet_keys_name_their_key_path(changes, path, words):
    problems = problems_of(spoiled(**changes))
    assert key_paths(problems) == [path], problems
    assert words in problems[0]


def test_fleet_keys_parse_with_their_defaults():
    config = config_from_mapping(
        spoiled(
            upstreams__catalog__url=["http://10.0.0.1:8080/v1", "http://catalog.local:8080/v1/"],
            upstreams__catalog__max_concurrency="auto",
            upstreams__catalog__outlier_detection={"base_ejection_time": "10s"},
            upstreams__pricing__address=["10.0.0.7:50061", "10.0.0.8:50061"],
            upstreams__pricing__balancer="round_robin",
        )
    )
    catalog, pricing = config.upstreams["catalog"], config.upstreams["pricing"]
    assert catalog.endpoints == ("http://10.0.0.1:8080/v1", "http://catalog.local:8080/v1")
    assert catalog.url == "http://10.0.0.1:8080/v1"
    assert catalog.adaptive_concurrency
    assert catalog.adaptive_max == 1000
    assert catalog.balancer == "least_request"
    assert catalog.resolve_interval == 30.0
    assert catalog.outlier_detection.base_ejection_time == 10.0
    assert catalog.outlier_detection.consecutive_failures == 5
    assert catalog.outlier_detection.max_ejection_percent == 50
    assert pricing.endpoints == ("10.0.0.7:50061", "10.0.0.8:50061")
    assert pricing.address == "10.0.0.7:50061"
    assert pricing.balancer == "round_robin"
    assert not pricing.adaptive_concurrency
    assert pricing.max_concurrency == 100


# check-config's help for a first hour (issue 22) ---------------------------------------------


def test_an_unknown_key_names_the_nearest_known_one():
    problems = problems_of(spoiled(upstreams__catalog__timout="1s", server__wokers=2, zzz=1))
    assert problems == [
        "zzz: unknown key",  # nothing near it: no guess
        "server.wokers: unknown key; did you mean `workers`?",
        "upstreams.catalog.timout: unknown key; did you mean `timeout`?",
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1m30s", 90.0), ("1h30m", 5400.0), ("2s500ms", 2.5), ("1h0m5s", 3605.0), ("1.5m", 90.0)],
)
def test_compound_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_config(f"server: {{shutdown_grace: {text}}}").server.shutdown_grace == seconds


@pytest.mark.parametrize("text", ["30s1m", "1m1m", "1m 30s", "1m30", "m30s", "1ms1s"])
def test_compound_durations_name_each_unit_once_largest_first(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_a_yaml_syntax_error_names_the_file_in_its_position_too(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  workers: [1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    (problem,) = raised.value.problems
    assert f'in "{path}", line' in problem
    assert "<unicode string>" not in problem


def test_an_upstream_without_kind_is_one_problem_not_a_cascade():
    document = {
        "upstreams": {"catalog": {"url": "http://127.0.0.1:8081"}},
        "aggregates": {"page": {"targets": [{"id": "p", "http": {"upstream": "catalog"}}]}},
        "auth": {"callers": {"web": {"token_subject": "web", "upstreams": ["catalog"]}}},
    }
    with pytest.raises(ConfigError) as raised:
        load_mapping(document)
    assert key_paths(raised.value.problems) == [
        "upstreams.catalog.kind",
        "auth.callers.web.token_subject",  # its own problem: no auth.jwt
    ]


def test_check_config_reads_standard_input_for_a_dash():
    ok = subprocess.run(
        [sys.executable, "-m", "aggregator", "check-config", "-"],
        input=SPEC_EXAMPLE, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert (ok.returncode, ok.stdout) == (0, "ok\n")
    bad = subprocess.run(
        [sys.executable, "-m", "aggregator", "check-config", "-"],
        input="server: [\n", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert bad.returncode == 1
    assert bad.stdout.startswith("<stdin>: not valid YAML: ")
    assert 'in "<stdin>", line' in bad.stdout
