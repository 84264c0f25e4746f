"""Named aggregates in config (docs/named-aggregates.md): each is planned at load, each problem
named by its key
path, as `aggregator check-config` prints it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from aggregator.aggregates import Catalog
from aggregator.config import ConfigError
from aggregator.load import load_mapping

PRODUCT_PAGE = """
upstreams:
  catalog: {kind: http, url: "http://127.0.0.1:8081", path_prefixes: [/products/, /reviews/]}
  pricing: {kind: grpc, address: "127.0.0.1:50061"}
aggregates:
  product_page:
    description: "Everything a product page shows"
    params:
      sku: {required: true}
      locale: {default: "en"}
    targets:
      - {id: product, required: true, decode_json: true,
         http: {upstream: catalog, path: "/products/{{params.sku}}",
                query: {lang: "{{params.locale}}"}}}
      - {id: price, decode_json: true,
         grpc: {upstream: pricing, method: /pricing.v1.Prices/Get, json: {sku: "{{params.sku}}"}}}
      - {id: reviews, depends_on: [product], timeout: 0.3s, fallback: [],
         http: {upstream: catalog, path: "/reviews/{{product.id}}",
                headers: {x-locale: "{{params.locale}}"}}}
"""


def _document(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(PRODUCT_PAGE)
    page = document["aggregates"]["product_page"]
    for index, target in changes.pop("targets", {}).items():
        page["targets"][index] = target
    page.update(changes)
    return document


def _problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        load_mapping(document)
    return refused.value.problems


def test_the_spec_example_loads_and_is_planned() -> None:
    config = load_mapping(_document()).config
    assert config.warnings == ()
    named = Catalog(config).get("product_page")
    assert named is not None
    assert [t.id for t in named.plan.targets] == ["product", "price", "reviews"]
    assert named.required == {"sku"}
    assert dict(named.defaults) == {"locale": "en"}
    assert named.with_params == (True, True, True)
    assert named.still_templated == (False, False, True)  # reviews reads product's body


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            {"id": "product", "http": {"upstream": "nowhere", "path": "/products/{{params.sku}}"}},
            "aggregates.product_page.targets[0].http.upstream: names no configured upstream",
        ),
        (
            {"id": "product", "http": {"upstream": "pricing", "path": "/products/x"}},
            "aggregates.product_page.targets[0].http.upstream: names a grpc upstream, not http",
        ),
        (
            {"id": "product", "http": {"upstream": "catalog", "path": "/products/../admin"}},
            "aggregates.product_page.targets[0].http.path: contains . or ..",
        ),
        (
            {"id": "product", "http": {"upstream": "catalog", "path": "https://evil.example/x"}},
            "aggregates.product_page.targets[0].http.path: must be a path",
        ),
        (
            {"id": "product", "http": {"upstream": "catalog", "path": "/admin/{{params.sku}}"}},
            "aggregates.product_page.targets[0].http.path: is outside "
            "upstreams.catalog.path_prefixes",
        ),
        (
            {"id": "product", "http": {"upstream": "catalog", "path": "/products/{{params.id}}"}},
            "aggregates.product_page.targets[0].http.path: {{params.id}} names undeclared "
            "parameter 'id' (declared: locale, sku)",
        ),
        (
            {"id": "product", "http": {"upstream": "catalog", "path": "/products/{{other.x}}"}},
            "aggregates.product_page.targets[0]: {{other.x}} names no target in depends_on",
        ),
        (
            {"id": "product", "timeout": 5, "http": {"upstream": "catalog", "path": "/x"}},
            "aggregates.product_page.targets[0]: not a Target: Failed to parse timeout field",
        ),
        (
            {"id": "params", "http": {"upstream": "catalog", "path": "/products/{{params.sku}}"}},
            "aggregates.product_page.targets[0].id: 'params' is where a named aggregate's "
            "parameters are",
        ),
    ],
)
def test_each_bad_target_is_one_problem_at_its_key_path(
    target: dict[str, Any], expected: str
) -> None:
    problems = _problems(_document(targets={0: target}))
    assert any(problem.startswith(expected) for problem in problems), problems


def test_a_cycle_and_an_unknown_dependency_are_named() -> None:
    document = _document(
        targets={
            0: {"id": "product", "depends_on": ["reviews"],
                "http": {"upstream": "catalog", "path": "/products/{{params.sku}}"}},
            1: {"id": "price", "depends_on": ["ghost"],
                "grpc": {"upstream": "pricing", "method": "/p.P/Get"}},
        }
    )  # fmt: skip
    problems = _problems(document)
    assert "aggregates.product_page.targets[1].depends_on: names unknown target 'ghost'" in (
        problems
    )
    assert "aggregates.product_page.targets: depends_on: cycle product -> reviews -> product" in (
        problems
    )


def test_parameter_declarations_are_checked() -> None:
    problems = _problems(
        _document(
            params={
                "sku": {"required": True, "default": "x"},
                "locale": {"required": False},
                "bad.name": {"default": "a"},
                "braces": {"default": "{{product.id}}"},
            }
        )
    )
    assert "aggregates.product_page.params.sku.default: a required parameter has no default" in (
        problems
    )
    assert any(p.startswith("aggregates.product_page.params.locale.required:") for p in problems)
    assert any(p.startswith("aggregates.product_page.params.bad.name:") for p in problems)
    assert any(p.startswith("aggregates.product_page.params.braces.default:") for p in problems)


def test_an_unused_parameter_is_a_warning_not_an_error() -> None:
    document = _document()
    document["aggregates"]["product_page"]["params"]["unused"] = {"default": 3}
    config = load_mapping(document).config
    assert config.warnings == (
        "aggregates.product_page.params.unused: declared but no target uses {{params.unused}}",
    )


def test_names_and_shape_are_checked() -> None:
    document = _document()
    document["aggregates"]["ad_hoc"] = document["aggregates"]["product_page"]
    document["aggregates"]["empty"] = {"description": "nothing", "targets": []}
    document["aggregates"]["typo"] = {"targets": [{"id": "a"}], "tagets": 1}
    problems = _problems(document)
    assert any(p.startswith("aggregates.ad_hoc: 'ad_hoc' is the metric label") for p in problems)
    assert "aggregates.empty.targets: required (a list of targets)" in problems
    assert "aggregates.typo.tagets: unknown key; did you mean `targets`?" in problems
    assert "aggregates.typo.targets[0]: one of http or grpc is required" in problems


def test_auth_aggregates_must_name_configured_aggregates() -> None:
    document = _document()
    document["server"] = {"tls": None}
    document["auth"] = {
        "jwt": {"issuer": "i", "audience": "a", "algorithms": ["HS256"], "secret_file": "x"},
        "callers": {"web": {"token_subject": "web", "aggregates": ["product_page", "nope"]}},
    }
    problems = _problems(document)
    assert "auth.callers.web.aggregates: 'nope' is not a configured aggregate" in problems
    assert not any(p.startswith("auth.callers.web.upstreams") for p in problems)


def test_check_config_prints_the_problems_and_warnings(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(PRODUCT_PAGE.replace("/products/{{params.sku}}", "/products/{{params.skew}}"))
    run = subprocess.run(
        [sys.executable, "-m", "aggregator", "check-config", str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert (
        "aggregates.product_page.targets[0].http.path: {{params.skew}} names undeclared "
        "parameter 'skew' (declared: locale, sku)"
    ) in run.stdout.splitlines()
    good = tmp_path / "good.yaml"
    good.write_text(
        PRODUCT_PAGE.replace("locale: {default", "unused: {default: 1}\n      locale: {default")
    )
    run = subprocess.run(
        [sys.executable, "-m", "aggregator", "check-config", str(good)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout
    assert run.stdout.splitlines() == [
        "warning: aggregates.product_page.params.unused: declared but no target uses "
        "{{params.unused}}",
        "ok",
    ]
