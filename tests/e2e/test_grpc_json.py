"""gRPC targets in JSON (docs/grpc-json.md): descriptors by reflection or file, JSON requests and
answers,
composition through gRPC answers, error details; against typed upstreams on real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, json_format, struct_pb2

from aggregator.config import ConfigError, config_from_mapping
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http
from tests.typed_upstreams import catalog_upstream, compile_descriptor_set
from tests.upstreams import refused_port, unanswered_port

SHOP = "/shop.v1.Catalog"


@pytest.fixture(scope="session")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_descriptor_set(tmp_path_factory.mktemp("protos") / "shop.pb")


@pytest.fixture(scope="session")
def compiled(descriptor_set: Path) -> bytes:
    return descriptor_set.read_bytes()


@pytest.fixture
async def catalog(compiled):
    async with catalog_upstream(compiled) as upstream:
        yield upstream


@pytest.fixture
async def bare(compiled):
    """The Catalog without reflection."""
    async with catalog_upstream(compiled, "none") as upstream:
        yield upstream


def shop(target_id: str, method: str, json: Any = None, upstream: str = "shop", **fields: Any):
    call = pb.GrpcCall(
        upstream=upstream,
        method=f"{SHOP}/{method}",
        request=fields.pop("request", b""),
        metadata=fields.pop("metadata", {}),
    )
    if json is not None:
        json_format.ParseDict(json, call.json)
    return pb.Target(id=target_id, grpc=call, **fields)


def as_dict(value: struct_pb2.Value) -> Any:
    return json_format.MessageToDict(value)


async def aggregate(stub, *targets: pb.Target, timeout: float = 5.0):
    return await collect(stub.Aggregate(pb.AggregateRequest(targets=targets), timeout=timeout))


PRODUCT_JSON = {
    "sku": "A-1",
    "displayName": "Product A-1",
    "color": "COLOR_BLUE",
    "stockCount": "9007199254740993",
    "price": {"currencyCode": "EUR", "units": "12", "nanos": 500000000},
    "tags": ["fresh", "local"],
    "warehouseStock": {"berlin": 3, "lyon": 0},
    "updatedAt": "2024-05-01T12:00:00Z",
    "shelfLife": "3600s",
    "attributes": {"organic": True, "grams": 250},
    "history": [{"currencyCode": "EUR", "units": "11"}],
}


# --- descriptors: config ----------------------------------------------------------------------


def grpc_config(**upstream: Any):
    return config_from_mapping(
        {"upstreams": {"shop": {"kind": "grpc", "address": "127.0.0.1:1", **upstream}}}
    )


def test_descriptors_file_is_checked_at_load(tmp_path, descriptor_set):
    assert grpc_config(descriptors=str(descriptor_set)).upstreams["shop"].descriptors == str(
        descriptor_set
    )
    assert grpc_config().upstreams["shop"].descriptors == "reflection"
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\xff\xff\xff")
    alone = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    kept = [file for file in alone.file if file.name == "shop/v1/shop.proto"]
    without_imports = tmp_path / "alone.pb"
    without_imports.write_bytes(descriptor_pb2.FileDescriptorSet(file=kept).SerializeToString())
    cases = {
        str(tmp_path / "absent.pb"): "cannot read",
        str(garbage): "is not a FileDescriptorSet",
        str(without_imports): "imports google/protobuf/duration.proto",
        "": "must be reflection or the path",
    }
    for value, words in cases.items():
        with pytest.raises(ConfigError) as error:
            grpc_config(descriptors=value)
        assert error.value.problems[0].startswith("upstreams.shop.descriptors: "), value
        assert words in error.value.problems[0]
    with pytest.raises(ConfigError, match=r"upstreams.web.descriptors: not used by kind http"):
        config_from_mapping(
            {"upstreams": {"web": {"kind": "http", "url": "http://x", "descriptors": "reflection"}}}
        )


# --- JSON in, JSON out --------------------------------------------------------------------------


async def test_json_request_and_answer_through_reflection(start_server, catalog):
    server, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    results, code, details, _ = await aggregate(
        stub, shop("p", "GetProduct", {"sku": "A-1"}, decode_json=True)
    )
    assert code == grpc.StatusCode.OK, details
    (result,) = results
    assert result.outcome == pb.OUTCOME_OK, result.error
    assert as_dict(result.json) == PRODUCT_JSON
    # body keeps the upstream's bytes: the message itself
    assert catalog.classes["Product"].FromString(result.body).stock_count == 9007199254740993
    (seen,) = catalog.recorder.requests
    assert seen["request"].sku == "A-1"
    assert server._service.descriptors["shop"].fetches == 1
    # grpcio-reflection serves v1alpha only: asked after v1 answered UNIMPLEMENTED
    assert "(grpc.reflection.v1alpha)" in repr(server._service.descriptors["shop"])


async def test_json_through_a_descriptor_set_file(start_server, bare, descriptor_set):
    _, stub = await start_server(
        shop={"kind": "grpc", "address": bare.address, "descriptors": str(descriptor_set)}
    )
    results, code, details, _ = await aggregate(
        stub, shop("p", "GetProduct", {"sku": "A-1"}, decode_json=True)
    )
    assert code == grpc.StatusCode.OK, details
    assert as_dict(results[0].json) == PRODUCT_JSON


async def test_every_field_kind_round_trips(start_server, catalog):
    _, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    sent = {**PRODUCT_JSON, "color": "COLOR_RED", "stockCount": "-9223372036854775808"}
    results, code, details, _ = await aggregate(stub, shop("e", "Echo", sent, decode_json=True))
    assert code == grpc.StatusCode.OK, details
    assert as_dict(results[0].json) == sent
    # Accepted as the mapping allows: enum numbers, int64 as a number, field names as in .proto
    loose = {"color": 1, "stock_count": 42, "display_name": "x"}
    results, code, details, _ = await aggregate(stub, shop("e", "Echo", loose, decode_json=True))
    assert code == grpc.StatusCode.OK, details
    expected = {"color": "COLOR_RED", "stockCount": "42", "displayName": "x"}
    assert as_dict(results[0].json) == expected


async def test_collect_merges_decoded_answers(start_server, catalog):
    _, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    response = await stub.Collect(
        pb.AggregateRequest(
            targets=[
                shop("p", "GetProduct", {"sku": "A-1"}, decode_json=True),
                http("r", "/json", query={"body": '{"a": 1}'}),
            ]
        ),
        timeout=5,
    )
    merged = json_format.MessageToDict(response.merged)
    assert merged["p"] == PRODUCT_JSON
    assert merged["r"] == {"a": 1}


async def test_bytes_requests_keep_working_without_reflection(start_server, bare, catalog):
    _, stub = await start_server(shop={"kind": "grpc", "address": bare.address})
    raw = catalog.classes["GetProductRequest"](sku="B-2").SerializeToString()
    results, code, details, _ = await aggregate(
        stub,
        shop("bytes", "GetProduct", request=raw),
        shop("typed", "GetProduct", {"sku": "B-2"}),
    )
    assert code == grpc.StatusCode.OK, details
    by_id = {result.id: result for result in results}
    assert by_id["bytes"].outcome == pb.OUTCOME_OK
    assert by_id["typed"].outcome == pb.OUTCOME_UNAVAILABLE
    assert "serves no server reflection" in by_id["typed"].error
    assert "upstreams.shop.descriptors" in by_id["typed"].error
    assert bare.calls() == 1  # the bytes one only


async def test_descriptors_are_fetched_once(start_server, catalog):
    server, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    targets = [shop(f"p{i}", "GetProduct", {"sku": f"S-{i}"}) for i in range(5)]
    outcomes = await asyncio.gather(*(aggregate(stub, *targets) for _ in range(4)))
    for results, code, details, _ in outcomes:
        assert code == grpc.StatusCode.OK, details
        assert {r.outcome for r in results} == {pb.OUTCOME_OK}
    assert server._service.descriptors["shop"].fetches == 1
    assert catalog.calls("GetProduct") == 20


async def test_reflection_v1_is_asked_first(start_server):
    """The aggregator serves v1 itself: as an upstream of another, its Health is called in JSON."""
    first, _ = await start_server()
    server, stub = await start_server(me={"kind": "grpc", "address": f"127.0.0.1:{first.port}"})
    target = pb.Target(
        id="health",
        decode_json=True,
        grpc=pb.GrpcCall(upstream="me", method="/grpc.health.v1.Health/Check"),
    )
    target.grpc.json.struct_value.update({"service": ""})
    results, code, details, _ = await aggregate(stub, target)
    assert code == grpc.StatusCode.OK, details
    assert as_dict(results[0].json) == {"status": "SERVING"}
    assert "(grpc.reflection.v1)" in repr(server._service.descriptors["me"])


# --- INVALID_ARGUMENT, nothing sent ---------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "words"),
    [
        (shop("bad", "GetProduct", {"skew": "A-1"}), ["'bad'", "grpc.json", "it has: sku"]),
        (shop("bad", "GetProduct", {"sku": 7}), ["'bad'", "sku"]),
        (shop("bad", "Echo", {"price": {"nanos": 2**40}}), ["'bad'", "nanos"]),
        (shop("bad", "Echo", {"color": "COLOR_GREEN"}), ["'bad'", "at color", "shop.v1.Color"]),
        (shop("bad", "Echo", {"price": "twelve"}), ["'bad'", "price"]),
        (shop("bad", "Restock", {"sku": "A-1"}), ["'bad'", "grpc.method", "Restock"]),
        (shop("bad", "Echo", {"sku": "A"}, request=b"\n\x01A"), ["'bad'", "request", "json"]),
    ],
    ids=["unknown-field", "wrong-type", "out-of-range", "bad-enum", "not-a-message",
         "unknown-method", "both"],
)  # fmt: skip
async def test_json_that_does_not_fit_is_refused_and_nothing_sent(
    start_server, catalog, rest, target, words
):
    _, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    results, code, details, _ = await aggregate(
        stub, shop("fine", "GetProduct", {"sku": "A-1"}), http("r", "/json"), target
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert results == []
    for word in words:
        assert word in details, details
    assert catalog.calls() == 0
    assert rest.recorder.requests == []


# --- reflection that is slow, absent or hostile -----------------------------------------------


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("hang", "did not answer in time"),
        ("garbage", "not a ServerReflectionResponse"),
        ("no-imports", "imports google/protobuf/"),
        ("endless", "more than 1024 files"),
    ],
)
async def test_hostile_reflection_makes_the_target_unavailable(start_server, compiled, kind, words):
    async with catalog_upstream(compiled, kind) as hostile:
        server, stub = await start_server(
            shop={"kind": "grpc", "address": hostile.address, "timeout": "300ms"}
        )
        started = time.perf_counter()
        results, code, details, _ = await aggregate(
            stub, shop("typed", "GetProduct", {"sku": "A-1"}), http("r", "/json")
        )
        elapsed = time.perf_counter() - started
        assert code == grpc.StatusCode.OK, details
        by_id = {result.id: result for result in results}
        assert by_id["typed"].outcome == pb.OUTCOME_UNAVAILABLE
        assert words in by_id["typed"].error
        assert "upstream 'shop'" in by_id["typed"].error
        assert by_id["r"].outcome == pb.OUTCOME_OK
        assert hostile.calls() == 0
        assert elapsed < 3.0  # bounded by the upstream's 300 ms, not the 5 s deadline
        # The server still serves; a failed fetch is not retried at once (told the same).
        results, code, _, _ = await aggregate(stub, shop("again", "GetProduct", {"sku": "A"}))
        assert results[0].outcome == pb.OUTCOME_UNAVAILABLE
        assert server._service.descriptors["shop"].fetches == 1


async def test_a_hanging_reflection_is_fetched_once_for_concurrent_calls(start_server, compiled):
    async with catalog_upstream(compiled, "hang") as hostile:
        server, stub = await start_server(
            shop={"kind": "grpc", "address": hostile.address, "timeout": "300ms"}
        )
        calls = [aggregate(stub, shop("t", "GetProduct", {"sku": "A"})) for _ in range(8)]
        for results, code, _, _ in await asyncio.gather(*calls):
            assert code == grpc.StatusCode.OK
            assert results[0].outcome == pb.OUTCOME_UNAVAILABLE
        assert server._service.descriptors["shop"].fetches == 1


async def test_a_short_deadline_does_not_cut_the_shared_fetch(start_server, compiled):
    async with catalog_upstream(compiled, "hang") as hostile:
        server, stub = await start_server(
            shop={"kind": "grpc", "address": hostile.address, "timeout": "2s"}
        )
        results, code, _, _ = await aggregate(
            stub, shop("t", "GetProduct", {"sku": "A"}), timeout=0.3
        )
        assert code == grpc.StatusCode.OK
        assert results[0].outcome in (pb.OUTCOME_UNAVAILABLE, pb.OUTCOME_TIMEOUT)
        assert repr(server._service.descriptors["shop"]).count("fetching") == 1


async def test_unreachable_upstream_is_unavailable_within_connect_timeout(start_server):
    _, stub = await start_server(
        shop={"kind": "grpc", "address": f"127.0.0.1:{refused_port()}", "timeout": "2s"}
    )
    started = time.perf_counter()
    results, code, _, _ = await aggregate(stub, shop("t", "GetProduct", {"sku": "A"}))
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_UNAVAILABLE
    assert "descriptors of upstream 'shop'" in results[0].error
    assert time.perf_counter() - started < 2.0


async def test_an_unknown_method_refreshes_once_a_second_at_most(start_server, catalog):
    server, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    _, code, details, _ = await aggregate(stub, shop("p", "GetProduct", {"sku": "A-1"}))
    assert code == grpc.StatusCode.OK, details
    for _ in range(3):
        _, code, details, _ = await aggregate(stub, shop("r", "Restock", {"sku": "A-1"}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "target 'r': grpc.method: upstream 'shop' has no method" in details
    assert server._service.descriptors["shop"].fetches == 2
    assert catalog.calls() == 1


async def test_a_redeployed_upstream_s_new_method_is_found_by_a_refresh(start_server, compiled):
    async with catalog_upstream(compiled) as first:
        port = first.port
        server, stub = await start_server(shop={"kind": "grpc", "address": first.address})
        results, code, details, _ = await aggregate(stub, shop("p", "GetProduct", {"sku": "A"}))
        assert code == grpc.StatusCode.OK, details
    async with catalog_upstream(compiled, extra_methods=("Restock",), port=port) as second:
        raw = second.classes["GetProductRequest"](sku="A").SerializeToString()
        for _ in range(100):  # until the channel has reconnected to the new process
            results, _, _, _ = await aggregate(stub, shop("b", "GetProduct", request=raw))
            if results[0].outcome == pb.OUTCOME_OK:
                break
            await asyncio.sleep(0.05)
        results, code, details, _ = await aggregate(
            stub, shop("r", "Restock", {"sku": "A-1"}, decode_json=True)
        )
        assert code == grpc.StatusCode.OK, details
        assert as_dict(results[0].json) == {"sku": "A-1"}
        assert server._service.descriptors["shop"].fetches == 2


# --- composition through gRPC answers -----------------------------------------------------------


async def test_a_depends_on_chain_through_a_grpc_answer(start_server, catalog, rest):
    _, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    results, code, details, _ = await aggregate(
        stub,
        # read without decode_json: still decoded for the targets that read it
        shop("product", "GetProduct", {"sku": "A-1"}),
        http(
            "rest",
            "/echo/{{product.price.currencyCode}}",
            query={"stock": "{{product.stockCount}}"},
            depends_on=["product"],
            decode_json=True,
        ),
        shop(
            "echo",
            "Echo",
            {"sku": "{{product.sku}}", "stockCount": "{{product.stockCount}}",
             "tags": "{{product.tags}}", "price": "{{product.price}}",
             "displayName": "from {{rest.method}}"},
            metadata={"x-shelf": "{{product.displayName}}"},
            depends_on=["product", "rest"],
            decode_json=True,
        ),
    )  # fmt: skip
    assert code == grpc.StatusCode.OK, details
    by_id = {result.id: result for result in results}
    assert [r.id for r in results] == ["product", "rest", "echo"]
    assert not by_id["product"].HasField("json")
    assert by_id["rest"].outcome == pb.OUTCOME_OK, by_id["rest"].error
    assert as_dict(by_id["rest"].json)["path"] == "/echo/EUR?stock=9007199254740993"
    assert as_dict(by_id["echo"].json) == {
        "sku": "A-1",
        "displayName": "from GET",
        "stockCount": "9007199254740993",  # int64 exact through its string form
        "tags": ["fresh", "local"],
        "price": PRODUCT_JSON["price"],
    }
    echo = next(seen for seen in catalog.recorder.requests if seen["method"] == "Echo")
    assert echo["metadata"]["x-shelf"] == "Product A-1"


async def test_for_each_over_an_array_in_a_grpc_answer(start_server, catalog):
    _, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    response = await stub.Collect(
        pb.AggregateRequest(
            targets=[
                shop("shelf", "ListProducts", {"shelf": "fruit", "pageSize": 2}),
                shop(
                    "each",
                    "GetProduct",
                    {"sku": "{{item.sku}}"},
                    depends_on=["shelf"],
                    for_each="{{shelf.products}}",
                    decode_json=True,
                ),
            ]
        ),
        timeout=5,
    )
    by_id = {result.id: result for result in response.results}
    assert set(by_id) == {"shelf", "each[0]", "each[1]"}
    merged = json_format.MessageToDict(response.merged)
    assert merged["each[0]"]["sku"] == "A-1"
    assert merged["each[1]"]["sku"] == "B-2"
    assert catalog.calls("GetProduct") == 2


async def test_a_substituted_value_that_does_not_fit_fails_that_target(start_server, catalog):
    _, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    results, _, _, _ = await aggregate(
        stub,
        shop("product", "GetProduct", {"sku": "A-1"}),
        # tags is a list of strings: a Money object does not fit; a metadata value must be ASCII
        shop("typed", "Echo", {"tags": "{{product.price}}"}, depends_on=["product"]),
        shop("src", "Echo", {"displayName": "café"}),
        shop("meta", "Echo", {}, metadata={"x-a": "{{src.displayName}}"}, depends_on=["src"]),
    )  # fmt: skip
    by_id = {result.id: result for result in results}
    assert by_id["typed"].outcome == pb.OUTCOME_ERROR
    assert "grpc.json does not fit shop.v1.Product" in by_id["typed"].error
    assert "tags" in by_id["typed"].error
    assert by_id["meta"].outcome == pb.OUTCOME_ERROR
    assert "must be printable ASCII" in by_id["meta"].error
    assert catalog.calls("Echo") == 1  # src's only


async def test_a_grpc_answer_without_descriptors_cannot_be_read(start_server, bare):
    _, stub = await start_server(shop={"kind": "grpc", "address": bare.address})
    raw = b"\n\x03A-1"
    results, _, _, _ = await aggregate(
        stub,
        shop("product", "GetProduct", request=raw),
        http("rest", "/echo/{{product.sku}}", depends_on=["product"]),
    )
    by_id = {result.id: result for result in results}
    assert by_id["product"].outcome == pb.OUTCOME_OK
    assert by_id["rest"].outcome == pb.OUTCOME_ERROR
    assert "'product'" in by_id["rest"].error


# --- error details --------------------------------------------------------------------------


async def test_error_details_are_read_into_the_sentence(start_server, catalog):
    _, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    details = ["error_info", "bad_request", "retry_info", "resource_info", "Secret"]
    results, code, _, _ = await aggregate(stub, shop("r", "Refuse", {"details": details}))
    assert code == grpc.StatusCode.OK
    error = results[0].error
    assert results[0].outcome == pb.OUTCOME_ERROR
    assert results[0].grpc_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error == (
        "shop answered gRPC INVALID_ARGUMENT: the catalog refuses (ErrorInfo SKU_LOCKED "
        "(shop.example.com); BadRequest sku: must be 8 digits; retry in 0.3s; ResourceInfo sku "
        "'A-1' owned by team-catalog: locked; type.googleapis.com/shop.v1.Secret)"
    )


async def test_error_details_are_bounded(start_server, catalog):
    _, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    details = ["long", *["Secret"] * 20]  # 21 details, one of 5000 characters
    results, _, _, _ = await aggregate(stub, shop("r", "Refuse", {"details": details}))
    error = results[0].error
    assert "R" * 200 not in error
    assert error.endswith("... (cut))")
    assert len(error) < 700


async def test_retry_info_is_honoured_by_retries(start_server, catalog):
    _, stub = await start_server(
        shop={
            "kind": "grpc",
            "address": catalog.address,
            "retry": {"attempts": 2, "backoff": "1ms", "max_backoff": "1ms",
                      "grpc_codes": ["UNAVAILABLE"]},
        }
    )  # fmt: skip
    unavailable = grpc.StatusCode.UNAVAILABLE.value[0]
    request = {"details": ["retry_info"], "code": unavailable}
    results, _, _, _ = await aggregate(stub, shop("r", "Refuse", request))
    (result,) = results
    assert result.outcome == pb.OUTCOME_UNAVAILABLE
    assert result.attempts == 2
    assert "retry in 0.3s" in result.error
    assert result.latency.ToNanoseconds() >= 300_000_000  # waited as the upstream asked
    # A delay the deadline cannot hold: no retry.
    results, _, _, _ = await aggregate(stub, shop("r", "Refuse", request), timeout=0.25)
    assert results[0].attempts == 1


async def test_large_requests_and_answers_go_through_the_thread_path(start_server, catalog):
    _, stub = await start_server(shop={"kind": "grpc", "address": catalog.address})
    tags = [f"tag-{i:06d}-" + "x" * 90 for i in range(1500)]  # about 150 KB each way
    results, code, details, _ = await aggregate(
        stub, shop("big", "Echo", {"sku": "B", "tags": tags}, decode_json=True)
    )
    assert code == grpc.StatusCode.OK, details
    assert as_dict(results[0].json) == {"sku": "B", "tags": tags}
    assert len(results[0].body) > 64 * 1024


async def test_a_cached_rest_call_fed_by_a_grpc_answer(start_server, catalog, rest):
    _, stub = await start_server(
        shop={"kind": "grpc", "address": catalog.address},
        cached={"kind": "http", "url": rest.url, "cache": {"ttl": "60s"}},
    )
    targets = [
        shop("product", "GetProduct", {"sku": "A-1"}),
        http("count", "/count/{{product.sku}}", upstream="cached", depends_on=["product"],
             decode_json=True),
    ]  # fmt: skip
    first, _, _, _ = await aggregate(stub, *targets)
    second, _, _, _ = await aggregate(stub, *targets)
    assert [r.cache for r in first if r.id == "count"] == [pb.CACHE_STATUS_MISS]
    assert [r.cache for r in second if r.id == "count"] == [pb.CACHE_STATUS_HIT]
    assert as_dict(second[-1].json) == {"n": 1}
    assert catalog.calls("GetProduct") == 2


async def test_a_connect_that_hangs_is_bounded_by_connect_timeout(start_server):
    with unanswered_port() as port:
        _, stub = await start_server(
            shop={"kind": "grpc", "address": f"127.0.0.1:{port}", "timeout": "4s",
                  "connect_timeout": "200ms"}
        )  # fmt: skip
        started = time.perf_counter()
        results, code, _, _ = await aggregate(stub, shop("t", "GetProduct", {"sku": "A"}))
        elapsed = time.perf_counter() - started
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_UNAVAILABLE
    assert "descriptors of upstream 'shop'" in results[0].error
    assert elapsed < 2.0  # the connect's 200 ms (and grpc's own rounding), not the 4 s timeout
