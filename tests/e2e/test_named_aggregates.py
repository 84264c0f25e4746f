"""Named aggregates called by name (docs/named-aggregates.md), against the real server and real
upstreams:
parameters land encoded where they stand, every refusal sends nothing, the safelist holds."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from aggregator.aggregates import Catalog
from aggregator.config import config_from_mapping
from aggregator.plan import Plan, make_plan
from aggregator.request import HttpRequest
from aggregator.security.outbound import forward_caller_metadata, plan_problems
from aggregator.substitution import Substitution
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import TRAILER_KEYS, collect, http, ids
from tests.e2e.test_auth import bearer, jwt_auth, serve, signing_key, token  # noqa: F401
from tests.upstreams import GrpcUpstream, RestUpstream

PAGE: dict[str, Any] = {
    "description": "Everything a page shows",
    "params": {"sku": {"required": True}, "locale": {"default": "en"}, "slow": {"default": 1}},
    "targets": [
        {
            "id": "product",
            "required": True,
            "decode_json": True,
            "http": {
                "upstream": "rest",
                "path": "/echo/products/{{params.sku}}",
                "query": {"lang": "{{params.locale}}", "sku": "{{params.sku}}"},
                "headers": {"x-sku": "{{params.sku}}"},
            },
        },
        {
            "id": "stock",
            "http": {
                "upstream": "rest",
                "method": "POST",
                "path": "/echo/stock",
                "json": {
                    "sku": "{{params.sku}}",
                    "n": "{{params.slow}}",
                    "who": "x-{{params.sku}}",
                },
            },
        },
        {"id": "slow", "http": {"upstream": "rest", "path": "/delay/{{params.slow}}"}},
        {
            "id": "price",
            "grpc": {
                "upstream": "rpc",
                "method": "/test.Upstream/Echo",
                "metadata": {"x-locale": "{{params.locale}}"},
            },
        },
        {
            "id": "reviews",
            "depends_on": ["product"],
            "http": {
                "upstream": "rest",
                "path": "/echo/reviews/{{params.locale}}/{{product.path}}",
            },
        },
    ],
}
EMPTY: dict[str, Any] = {
    "targets": [{"id": "ping", "http": {"upstream": "rest", "path": "/echo/ping"}}]
}


def named(name: str, **params: Any) -> pb.AggregateRequest:
    request = pb.AggregateRequest(aggregate=name)
    request.params.update(params)
    return request


def nothing_sent(rest: RestUpstream, rpc: GrpcUpstream) -> bool:
    return rest.recorder.requests == [] and rpc.recorder.requests == []


@pytest.fixture
async def page(start_server: Any) -> Any:
    _, stub = await start_server(aggregates={"page": PAGE, "ping": EMPTY})
    return stub


def _sent(rest: RestUpstream, prefix: str) -> dict[str, Any]:
    return next(seen for seen in rest.recorder.requests if seen["path"].startswith(prefix))


async def test_parameters_land_encoded_where_they_stand(
    page: Any, rest: RestUpstream, rpc: Any
) -> None:
    sku = "a/b?c#d ..é"
    results, code, details, trailers = await collect(
        page.Aggregate(named("page", sku=sku, locale="fr", slow=30), timeout=5)
    )
    assert code == grpc.StatusCode.OK, details
    assert sorted(ids(results)) == ["price", "product", "reviews", "slow", "stock"]
    assert trailers.keys() >= TRAILER_KEYS
    assert trailers["x-aggregate-completed"] == "true"
    product = _sent(rest, "/echo/products/")
    # One segment, whatever the value: / ? # and the space are percent-encoded.
    assert product["path"].split("?")[0] == "/echo/products/a%2Fb%3Fc%23d%20..%C3%A9"
    echoed = json.loads(next(r for r in results if r.id == "product").body)
    assert echoed["query"] == {"lang": "fr", "sku": sku}
    assert product["headers"]["x-sku"] == sku
    stock = _sent(rest, "/echo/stock")
    # A whole reference keeps the value's type; inside a string it is text.
    assert json.loads(stock["body"]) == {"sku": sku, "n": 30, "who": f"x-{sku}"}
    assert _sent(rest, "/delay/")["path"] == "/delay/30"
    assert rpc.recorder.requests[0]["metadata"]["x-locale"] == "fr"
    # Dependencies' values still fill their references, after the parameters.
    reviews = _sent(rest, "/echo/reviews/")
    assert reviews["path"].startswith("/echo/reviews/fr/%2Fecho%2Fproducts%2Fa%252Fb")


async def test_defaults_fill_what_a_call_leaves_out(page: Any, rest: RestUpstream) -> None:
    results, code, details, _ = await collect(page.Aggregate(named("page", sku="A-1"), timeout=5))
    assert code == grpc.StatusCode.OK, details
    echoed = json.loads(next(r for r in results if r.id == "product").body)
    assert echoed["query"] == {"lang": "en", "sku": "A-1"}
    assert _sent(rest, "/delay/")["path"] == "/delay/1"
    assert json.loads(_sent(rest, "/echo/stock")["body"])["n"] == 1


async def test_results_come_in_completion_order_with_trailers_as_ad_hoc(
    page: Any, rest: RestUpstream
) -> None:
    results, code, _, trailers = await collect(
        page.Aggregate(named("page", sku="A-1", slow=400), timeout=5)
    )
    assert code == grpc.StatusCode.OK
    assert ids(results)[-1] == "slow"
    assert trailers["x-aggregate-succeeded"] == "5"
    assert trailers["x-aggregate-failed"] == ""
    collected = await page.Collect(named("page", sku="A-1"), timeout=5)
    assert sorted(collected.merged.fields) == ["product", "reviews", "slow", "stock"]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (named("nope", sku="x"), "aggregate: not a configured aggregate"),
        (named("page"), "params.sku: required by aggregate 'page'"),
        (named("page", sku="x", color="red"), "params.color: aggregate 'page' declares no such"),
        (named("page", sku="{{product.path}}"), "params.sku: values may not contain {{"),
        (named("page", sku=None), "params.sku: null is not a value"),
        (named("page", sku=float("nan")), "params.sku: NaN and Infinity are not JSON numbers"),
        (named("page", sku=float("inf")), "params.sku: NaN and Infinity are not JSON numbers"),
        (
            named("page", sku=".."),
            "target 'product': {{params.sku}} is . or ..: not a path segment",
        ),
        (
            named("page", sku="a\r\nx-evil: 1"),
            "target 'product': http.headers['x-sku']: value contains control characters",
        ),
        (named("page", sku="x" * 9000), "server.max_path_bytes"),
        (
            pb.AggregateRequest(aggregate="page", targets=[http("a", "/echo/a")]),
            "targets and aggregate: set one of them, not both",
        ),
        (
            pb.AggregateRequest(params=struct_pb2.Struct(fields={"sku": struct_pb2.Value()})),
            "params: given without aggregate",
        ),
    ],
)
async def test_a_bad_call_is_invalid_argument_and_sends_nothing(
    page: Any, rest: RestUpstream, rpc: GrpcUpstream, request_: pb.AggregateRequest, expected: str
) -> None:
    results, code, details, trailers = await collect(page.Aggregate(request_, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in details
    assert results == []
    assert trailers.keys() >= TRAILER_KEYS
    assert nothing_sent(rest, rpc)


async def test_values_cannot_join_into_a_reference(start_server: Any, rest, rpc) -> None:
    joined = {
        "params": {"a": {"required": True}, "b": {"required": True}},
        "targets": [
            {"id": "first", "http": {"upstream": "rest", "path": "/echo/first"}},
            {"id": "second", "depends_on": ["first"],
             "http": {"upstream": "rest", "path": "/echo/x",
                      "query": {"q": "{{params.a}}{{params.b}}{{first.path}}"}}},
        ],
    }  # fmt: skip
    _, stub = await start_server(aggregates={"joined": joined})
    _, code, details, _ = await collect(
        stub.Aggregate(named("joined", a="{", b="{first.method}}"), timeout=5)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "would make a {{...}} reference" in details
    assert nothing_sent(rest, rpc)


async def test_allow_ad_hoc_false_refuses_targets_and_runs_named_ones(
    start_server: Any, rest: RestUpstream, rpc: GrpcUpstream
) -> None:
    _, stub = await start_server(server={"allow_ad_hoc": False}, aggregates={"ping": EMPTY})
    request = pb.AggregateRequest(targets=[http("a", "/echo/a")])
    results, code, details, trailers = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "server.allow_ad_hoc" in details
    assert results == []
    assert trailers.keys() >= TRAILER_KEYS
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Collect(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert nothing_sent(rest, rpc)
    results, code, _, _ = await collect(stub.Aggregate(named("ping"), timeout=5))
    assert code == grpc.StatusCode.OK
    assert [seen["path"] for seen in rest.recorder.requests] == ["/echo/ping"]


async def test_list_aggregates_names_their_parameters_and_targets(page: Any) -> None:
    listed = await page.ListAggregates(pb.ListAggregatesRequest(), timeout=5)
    assert [a.name for a in listed.aggregates] == ["page", "ping"]
    first = listed.aggregates[0]
    assert first.description == "Everything a page shows"
    assert list(first.target_ids) == ["product", "stock", "slow", "price", "reviews"]
    params = {p.name: p for p in first.params}
    assert params["sku"].required
    assert not params["sku"].HasField("default")
    assert not params["locale"].required
    assert params["locale"].default.string_value == "en"
    assert params["slow"].default.number_value == 1


async def test_calls_are_counted_and_logged_by_aggregate_name(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aggregator")
    server, stub = await start_server(
        server={"metrics_address": "127.0.0.1:0"}, aggregates={"page": PAGE, "ping": EMPTY}
    )
    await collect(stub.Aggregate(named("ping"), timeout=5))
    await collect(stub.Aggregate(named("page"), timeout=5))  # sku missing
    await collect(stub.Aggregate(named("no-such-name-123"), timeout=5))
    await collect(stub.Aggregate(pb.AggregateRequest(targets=[http("a", "/echo/a")]), timeout=5))
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def value(name: str, **labels: str) -> float:
        return next(s.value for s in samples if s.name == name and s.labels == labels)

    assert value("aggregator_calls_total", code="OK", aggregate="ping") == 1
    assert value("aggregator_calls_total", code="INVALID_ARGUMENT", aggregate="page") == 1
    # A name that is not configured never becomes a label value.
    assert value("aggregator_calls_total", code="INVALID_ARGUMENT", aggregate="ad_hoc") == 1
    assert value("aggregator_calls_total", code="OK", aggregate="ad_hoc") == 1
    assert value("aggregator_call_duration_seconds_count", aggregate="ping") == 1
    assert "no-such-name-123" not in text
    lines = {(r.aggregate, r.code, r.targets) for r in caplog.records if hasattr(r, "aggregate")}
    assert lines == {
        ("ping", "OK", 1), ("page", "INVALID_ARGUMENT", 5),
        ("ad_hoc", "INVALID_ARGUMENT", 0), ("ad_hoc", "OK", 1),
    }  # fmt: skip


@pytest.fixture
def named_auth(jwt_auth: dict[str, Any]) -> dict[str, Any]:  # noqa: F811
    jwt_auth["callers"] = {
        "web": {"token_subject": "web-frontend", "aggregates": ["ping"]},
        "ops": {"token_subject": "ops", "upstreams": ["*"], "aggregates": ["*"]},
        "old": {"token_subject": "old", "upstreams": ["rest"]},
    }
    return jwt_auth


async def test_auth_limits_the_aggregates_each_caller_may_run(
    start_server: Any,
    named_auth: dict[str, Any],
    signing_key: Any,  # noqa: F811
    rest,
    rpc,
) -> None:
    _, stub = await start_server(None, named_auth, {"page": PAGE, "ping": EMPTY})
    web, ops, old = (bearer(token(signing_key, subject=s)) for s in ("web-frontend", "ops", "old"))
    for metadata, name in ((web, "page"), (web, "nope"), (old, "ping")):
        _, code, details, _ = await collect(
            stub.Aggregate(named(name, sku="x"), timeout=5, metadata=metadata)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED, (name, details)
        assert f"may not run aggregate {name!r}" in details
    # web may run ping, though it may call no upstream itself.
    _, code, _, _ = await collect(
        stub.Aggregate(pb.AggregateRequest(targets=[http("a", "/echo/a")]), timeout=5, metadata=web)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert nothing_sent(rest, rpc)
    _, code, _, _ = await collect(stub.Aggregate(named("ping"), timeout=5, metadata=web))
    assert code == grpc.StatusCode.OK
    _, code, details, _ = await collect(
        stub.Aggregate(named("page", sku="x"), timeout=5, metadata=ops)
    )
    assert code == grpc.StatusCode.OK, details
    listed = await stub.ListAggregates(pb.ListAggregatesRequest(), timeout=5, metadata=web)
    assert [a.name for a in listed.aggregates] == ["ping"]
    listed = await stub.ListAggregates(pb.ListAggregatesRequest(), timeout=5, metadata=ops)
    assert [a.name for a in listed.aggregates] == ["page", "ping"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListAggregates(pb.ListAggregatesRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_named_call_plans_in_less_cpu_than_the_same_targets_ad_hoc() -> None:
    """docs/named-aggregates.md "planned once": a call binds its parameters into the plan made at
    load. What a
    call costs before its fan-out (parse, plan or bind, the upstreams' rules), in CPU time,
    the median of 5 runs: the fan-out after it is the same code for both."""
    upstreams = {f"u{i}": {"kind": "http", "url": f"http://127.0.0.1:{9000 + i}"} for i in range(5)}
    paths = [f"/products/{{{{params.sku}}}}/part{i}" for i in range(5)]
    targets = [
        {"id": f"t{i}", "http": {"upstream": f"u{i}", "path": path}} for i, path in enumerate(paths)
    ]
    config = config_from_mapping(
        {
            "upstreams": upstreams,
            "aggregates": {"page": {"params": {"sku": {"required": True}}, "targets": targets}},
        }
    )
    catalog = Catalog(config)
    ad_hoc = pb.AggregateRequest(
        targets=[http(f"t{i}", path.replace("{{params.sku}}", "A-1042"), upstream=f"u{i}")
                 for i, path in enumerate(paths)]
    ).SerializeToString()  # fmt: skip
    by_name = named("page", sku="A-1042").SerializeToString()

    def run_ad_hoc() -> Plan:
        request = pb.AggregateRequest.FromString(ad_hoc)
        return make_plan(request, config)

    def run_named() -> Plan:
        request = pb.AggregateRequest.FromString(by_name)
        aggregate = catalog.get(request.aggregate)
        assert aggregate is not None
        return aggregate.bind(request.params)

    assert [t.request for t in run_named().targets] == [t.request for t in run_ad_hoc().targets]

    def cpu(run: Callable[[], Plan]) -> float:
        times = []
        for _ in range(5):
            started = time.process_time_ns()
            for _ in range(2000):
                assert not plan_problems(forward_caller_metadata(run(), ()))
            times.append(time.process_time_ns() - started)
        return statistics.median(times)

    assert cpu(run_named) <= cpu(run_ad_hoc) * 1.1


@pytest.mark.parametrize(
    "value",
    ["A-1042", "a/b", "x?y#z", "é ü", "..x", "a.b", "%2F", "_~-", "", 3, 2.5, -1, True, False],
)
def test_a_parameter_is_encoded_exactly_as_a_dependency_value(value: Any) -> None:
    templates = {"path": "/x/{{%s.v}}/y", "query": "a{{%s.v}}", "header": "v={{%s.v}}"}
    config = config_from_mapping(
        {
            "upstreams": {"u": {"kind": "http", "url": "http://127.0.0.1:9000"}},
            "aggregates": {"p": {"params": {"v": {"required": True}}, "targets": [{
                "id": "t", "http": {"upstream": "u", "path": templates["path"] % "params",
                                    "query": {"q": templates["query"] % "params"},
                                    "headers": {"x-v": templates["header"] % "params"}}}]}},
        }
    )  # fmt: skip
    aggregate = Catalog(config).get("p")
    assert aggregate is not None
    (target,) = aggregate.bind(named("p", v=value).params).targets
    as_dependency = Substitution(["dep"], lambda _: {"v": value})
    request = target.request
    assert isinstance(request, HttpRequest)
    assert request.path == as_dependency.path(templates["path"] % "dep")
    assert request.query == (("q", as_dependency.text(templates["query"] % "dep")),)
    assert request.headers == (("x-v", as_dependency.header(templates["header"] % "dep")),)
    assert not target.templated
