"""Security review (issue 17), the decode side: large JSON bodies off the loop and capped per call,
mixed RSA/EC JWT keys, log injection, mTLS with a stranger's certificate, slow-reading callers and
an aggregator configured as its own upstream. Real servers and sockets on 127.0.0.1 throughout."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import ssl
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.logs import TextFormatter
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import collect, http
from tests.e2e.test_auth import AUDIENCE, ISSUER, bearer, public_pem, rsa_key, token
from tests.e2e.test_tls import server_tls
from tests.upstreams import free_port, raw_upstream

MIB = 1024 * 1024


def big_document(size: int) -> bytes:
    """A JSON object of about ``size`` bytes, shaped like a catalogue page (many small objects)."""
    item = {"id": 0, "name": "item name", "price": 12.5, "tags": ["a", "b"], "ok": True}
    one = len(json.dumps(item)) + 2
    items = [dict(item, id=i) for i in range(size // one)]
    return json.dumps({"items": items}).encode()


@contextlib.asynccontextmanager
async def big_json_upstream(body: bytes) -> AsyncIterator[str]:
    """An aiohttp app answering every path with ``body`` as application/json."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
def one_mib_json() -> bytes:
    return big_document(MIB - 4096)


@pytest.fixture
async def big(one_mib_json: bytes) -> AsyncIterator[str]:
    async with big_json_upstream(one_mib_json) as url:
        yield url


def big_upstream(url: str) -> dict[str, Any]:
    return {"kind": "http", "url": url, "max_response_bytes": 2 * MIB, "timeout": "10s"}


@contextlib.asynccontextmanager
async def big_channel(port: int) -> AsyncIterator[grpc.aio.Channel]:
    """A channel that takes answers of any size these tests make (grpc's 4 MiB default would
    refuse a Collect of a few 1 MiB bodies and their decoded JSON)."""
    options = (("grpc.max_receive_message_length", 64 * MIB),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        yield channel


async def health_latencies(port: int, busy: asyncio.Task[Any]) -> list[float]:
    """Health checks, one after another, for as long as ``busy`` runs: each one's latency."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=5)  # connected first
        for _ in range(10_000):
            if busy.done():
                break
            started = time.perf_counter()
            await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            latencies.append(time.perf_counter() - started)
    return latencies


# Finding 7. Before the fix, json_format.Parse ran on the event loop: each 1 MiB body held it for
# 0.2-0.4 s here (3-5 s on a loaded machine), and health checks waited that long.
async def test_large_json_bodies_do_not_stall_health_checks(start_server, big, one_mib_json):
    aggregator, _ = await start_server(big=big_upstream(big))
    targets = [http(f"t{i}", f"/{i}", upstream="big") for i in range(2)]
    targets += [http(f"d{i}", f"/d{i}", upstream="big", decode_json=True) for i in range(2)]
    worst = []
    for _ in range(3):
        async with big_channel(aggregator.port) as channel:
            # The answer is read as bytes and parsed once the checks are done: parsing it takes
            # this process's loop (the test's client shares it with the server) for 50 ms.
            collect_bytes = channel.unary_unary(
                "/aggregator.v1.Aggregator/Collect",
                request_serializer=pb.AggregateRequest.SerializeToString,
                response_deserializer=None,
            )
            call = asyncio.ensure_future(
                collect_bytes(pb.AggregateRequest(targets=targets), timeout=30)
            )
            latencies = await health_latencies(aggregator.port, call)
            response = pb.CollectResponse.FromString(await call)
        worst.append(max(latencies, default=0.0))
        print(f"health checks: {len(latencies)}, worst {worst[-1] * 1000:.0f} ms")
        assert sorted(response.merged.fields) == sorted(t.id for t in targets)
        assert all(r.outcome == pb.OUTCOME_OK and not r.error for r in response.results)
        assert len(response.merged.fields["t0"].struct_value.fields["items"].list_value.values)
    # Four 1 MiB bodies decoded per call; a health check waits for no decode as a whole.
    assert statistics.median(worst) < 0.4, worst


async def test_bodies_past_max_decoded_bytes_keep_their_body_and_say_why(
    start_server, big, one_mib_json
):
    limit = 2 * len(one_mib_json) + 1000  # two bodies fit, not three
    aggregator, _ = await start_server(server={"max_decoded_bytes": limit}, big=big_upstream(big))
    targets = [http(f"t{i}", f"/{i}", upstream="big", decode_json=True) for i in range(3)]
    async with big_channel(aggregator.port) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        response = await stub.Collect(pb.AggregateRequest(targets=targets), timeout=30)
    results = {r.id: r for r in response.results}
    refused = [r for r in results.values() if r.error]
    assert len(refused) == 1  # whichever finished last
    [late] = refused
    assert late.outcome == pb.OUTCOME_OK
    assert not late.HasField("json")
    assert len(late.body) > MIB - 8192
    assert f"past server.max_decoded_bytes ({limit})" in late.error
    assert sorted(response.merged.fields) == sorted(set(results) - {late.id})  # docs/composition.md


async def test_bodies_dependents_read_count_against_max_decoded_bytes(start_server, big):
    # A body read only by its dependents (no decode_json) is parsed like decode_json's: off the
    # loop when large, and within the call's allowance; past it the dependent fails saying so.
    aggregator, _ = await start_server(
        server={"max_decoded_bytes": 64 * 1024}, big=big_upstream(big)
    )
    source = http("source", "/0", upstream="big")
    reader = http("reader", "/echo/{{source.n}}", depends_on=["source"])
    async with big_channel(aggregator.port) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        response = await stub.Collect(pb.AggregateRequest(targets=[source, reader]), timeout=30)
    results = {r.id: r for r in response.results}
    assert results["source"].outcome == pb.OUTCOME_OK
    assert results["reader"].outcome == pb.OUTCOME_ERROR
    assert "dependency 'source' refused: JSON not decoded" in results["reader"].error
    assert "past server.max_decoded_bytes (65536)" in results["reader"].error


async def test_json_too_deep_for_protobuf_is_refused_and_the_call_still_answers(start_server):
    deep = ('{"a":' * 40 + "1" + "}" * 40).encode()  # 121 message levels once a Value
    shallow = ('{"a":' * 20 + "1" + "}" * 20).encode()
    async with big_json_upstream(deep) as deep_url, big_json_upstream(shallow) as shallow_url:
        _, stub = await start_server(deep={"kind": "http", "url": deep_url},
                                     shallow={"kind": "http", "url": shallow_url})  # fmt: skip
        targets = [
            http("deep", "/", upstream="deep", decode_json=True),
            http("shallow", "/", upstream="shallow", decode_json=True),
        ]
        # The client parses what it gets: before, the deep Value was sent and unreadable.
        response = await stub.Collect(pb.AggregateRequest(targets=targets), timeout=10)
        results, code, _, _ = await collect(
            stub.Aggregate(pb.AggregateRequest(targets=targets), timeout=10)
        )
    by_id = {r.id: r for r in response.results}
    assert "nested deeper than a protobuf Value can carry" in by_id["deep"].error
    assert by_id["deep"].body == deep
    assert not by_id["deep"].HasField("json")
    assert by_id["shallow"].HasField("json")
    assert not by_id["shallow"].error
    assert sorted(response.merged.fields) == ["shallow"]
    assert code == grpc.StatusCode.OK
    assert {r.id: r.HasField("json") for r in results} == {"deep": False, "shallow": True}


async def test_a_call_cancelled_while_its_bodies_decode_leaves_no_work_behind(start_server, big):
    aggregator, stub = await start_server(big=big_upstream(big))
    targets = [http(f"t{i}", f"/{i}", upstream="big") for i in range(6)]
    calls = [
        asyncio.ensure_future(stub.Collect(pb.AggregateRequest(targets=targets), timeout=30))
        for _ in range(3)
    ]
    for _ in range(5000):  # until a body is being decoded on the thread
        if aggregator.offload.busy:
            break
        await asyncio.sleep(0.001)
    assert aggregator.offload.busy == 1  # one thread, whatever the number of calls
    for call in calls:
        call.cancel()
    await asyncio.wait(calls)
    # The one body in progress finishes on the thread; nothing queued behind it runs.
    for _ in range(5000):
        if not aggregator.offload.busy:
            break
        await asyncio.sleep(0.001)
    assert aggregator.offload.busy == 0
    assert [t.name for t in threading.enumerate()].count("offload_0") == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("json-decode_1")]
    response = await stub.Collect(pb.AggregateRequest(targets=[http("small", "/echo")]), timeout=5)
    assert [r.outcome for r in response.results] == [pb.OUTCOME_OK]


# Finding 9. Before: PyJWT raised TypeError for the RSA key tried against an ES256 token: the
# caller got UNKNOWN, and every garbage token signed "ES256" put a traceback in the log.
@pytest.fixture
def mixed_keys(tmp_path: Path) -> tuple[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, dict]:
    rsa_private, ec_private = rsa_key(), ec.generate_private_key(ec.SECP256R1())
    other_curve = ec.generate_private_key(ec.SECP384R1())
    paths = []
    for name, key in (("rsa", rsa_private), ("p384", other_curve), ("ec", ec_private)):
        path = tmp_path / f"{name}.pem"
        path.write_bytes(public_pem(key))
        paths.append(str(path))
    auth = {
        "jwt": {"issuer": ISSUER, "audience": AUDIENCE, "keys": paths},
        "callers": {"web": {"token_subject": "web-frontend", "upstreams": ["rest"]}},
    }
    return rsa_private, ec_private, auth


async def test_mixed_rsa_and_ec_keys_accept_both_and_refuse_garbage_quietly(
    start_server, mixed_keys, caplog
):
    rsa_private, ec_private, auth = mixed_keys
    _, stub = await start_server(auth=auth)
    request = pb.AggregateRequest(targets=[http("page", "/echo/page")])

    async def code_for(value: str) -> grpc.StatusCode:
        call = stub.Aggregate(request, timeout=5, metadata=bearer(value))
        return (await collect(call))[1]

    assert await code_for(token(ec_private, algorithm="ES256")) == grpc.StatusCode.OK
    assert await code_for(token(rsa_private, algorithm="RS256")) == grpc.StatusCode.OK
    stranger = ec.generate_private_key(ec.SECP256R1())
    garbage = [
        token(stranger, algorithm="ES256"),  # no configured key signed it
        token(ec.generate_private_key(ec.SECP384R1()), algorithm="ES384"),  # not accepted
        token(rsa_key(), algorithm="RS256"),
        token(ec_private, algorithm="ES256").rsplit(".", 1)[0] + ".AAAA",  # bad signature
        _with_header(token(rsa_private), {"alg": "ES256", "typ": "JWT"}),  # RS256 signature
        _with_header(token(ec_private, algorithm="ES256"), {"alg": "RS256"}),
        _with_header(token(ec_private, algorithm="ES256"), {"alg": "ES256", "kid": ["x"]}),
        "not.a.jwt",
        "e30.e30.",
    ]
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        codes = [await code_for(value) for value in garbage]
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * len(garbage)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert "Traceback" not in caplog.text


def _with_header(value: str, header: dict[str, Any]) -> str:
    """The token with its header replaced (its signature kept): what an attacker can send."""
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return encoded + "." + value.split(".", 1)[1]


class _Lines(logging.Handler):
    """The aggregator's log lines as the text formatter writes them; ``aggregate`` is set when
    an aggregate's own line (written after the call's status has gone) has come."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(TextFormatter())
        self.lines: list[str] = []
        self.aggregate = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        if record.getMessage().startswith("aggregate "):
            self.aggregate.set()


@pytest.fixture
def text_log() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("aggregator")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _fields_of(line: str) -> list[str]:
    """The keys a logfmt reader finds after the message (quoted values skipped whole)."""
    tail = line.split(" aggregator ", 1)[1]
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', tail)
    return re.findall(r"(?:^| )([A-Za-z_][\w.]*)=", unquoted)


# Finding 11. Before: the reason phrase reached the line raw (ESC, VT) and unquoted, so the
# line gained a field b=c and a terminal turned red.
async def test_hostile_reason_phrases_and_header_names_cannot_forge_log_fields(
    start_server, text_log
):
    hostile = (
        b"HTTP/1.1 500 a\x1b[31m b=c\x0b\x0c\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    async with raw_upstream({"/boom": [hostile, None]}) as upstream:
        _, stub = await start_server(hostile={"kind": "http", "url": upstream.url})
        targets = [http("boom", "/boom", upstream="hostile", required=True)]
        _, code, _, _ = await collect(
            stub.Aggregate(pb.AggregateRequest(targets=targets), timeout=5)
        )
        assert code != grpc.StatusCode.OK
        await asyncio.wait_for(text_log.aggregate.wait(), 5)
        text_log.aggregate.clear()
        forged = http("h", "/echo", headers={"x b=c\x1b[2J": "v"}, required=True)
        _, code, _, _ = await collect(
            stub.Aggregate(pb.AggregateRequest(targets=[forged]), timeout=5)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        await asyncio.wait_for(text_log.aggregate.wait(), 5)
    lines = [line for line in text_log.lines if " aggregate " in line]
    assert len(lines) == 2
    expected = ["request_id", "aggregate", "code", "targets", "results", "failed", "elapsed_ms",
                "overhead_ms", "slowest", "error"]  # fmt: skip
    for line in lines:
        assert not [ch for ch in line if not ch.isprintable()], line
        assert _fields_of(line) == expected, line
    assert 'answered HTTP 500 a\\x1b[31m b=c"' in lines[0]  # kept, escaped, in quotes


# Not yet checked (c): an aggregator as its own gRPC upstream. Before, a caller nesting
# AggregateRequests in `request` bytes made the server call itself once per level and target,
# as deep as it liked (here 16 calls to /echo through 15 aggregates).
def _nested(levels: int, fan_out: int) -> bytes:
    """An AggregateRequest whose targets Collect (from the server itself) the one a level down;
    the bottom one calls /echo. Each target also tries to reset the hop count."""
    request = pb.AggregateRequest(targets=[http("leaf", "/echo")])
    for _ in range(levels):
        call = pb.GrpcCall(
            upstream="self",
            method="/aggregator.v1.Aggregator/Collect",
            request=request.SerializeToString(),
            metadata={"x-aggregator-hops": "0"},
        )
        request = pb.AggregateRequest(
            targets=[pb.Target(id=f"t{i}", grpc=call) for i in range(fan_out)]
        )
    return request.SerializeToString()


async def test_an_aggregator_calling_itself_stops_at_the_third_hop(start_server, rest, text_log):
    port = free_port()
    self_upstream = {"kind": "grpc", "address": f"127.0.0.1:{port}", "timeout": "5s"}
    _, stub = await start_server(server={"address": f"127.0.0.1:{port}"}, self=self_upstream)
    started = time.perf_counter()
    response = await stub.Collect(pb.AggregateRequest.FromString(_nested(4, 2)), timeout=10)
    assert time.perf_counter() - started < 5
    assert [r.outcome for r in response.results] == [pb.OUTCOME_OK] * 2  # the first hop ran
    for result in response.results:
        inner = pb.CollectResponse.FromString(result.body)
        assert [r.outcome for r in inner.results] == [pb.OUTCOME_ERROR] * 2
        for refused in inner.results:
            assert "FAILED_PRECONDITION" in refused.error
            assert "come through 2 aggregators (x-aggregator-hops), more than 1" in refused.error
    assert rest.recorder.requests == []  # the bottom of the nest was never reached
    refusals = [line for line in text_log.lines if "code=FAILED_PRECONDITION" in line]
    assert len(refusals) == 4  # 2 x 2 at the third hop, and no call after them


# Not yet checked (a): mTLS with a certificate from another CA is refused by the TLS handshake
# itself (tests/e2e/test_tls.py shows the gRPC client's UNAVAILABLE; this shows where it happens:
# the server ends the connection in the handshake and never sends a byte of HTTP/2).
async def _first_bytes(port: int, ca: trustme.CA, client: trustme.LeafCert, version: Any) -> Any:
    """What a TLS client with ``client``'s certificate reads after sending HTTP/2's preface: the
    server's SETTINGS when it accepted the certificate; b"" or the error when it did not."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    client.configure_cert(context)
    context.set_alpn_protocols(["h2"])
    context.minimum_version = context.maximum_version = version
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
        )
    except (ssl.SSLError, ConnectionError) as exc:  # TLS 1.2: the handshake fails
        return exc
    try:  # TLS 1.3: the client's handshake ends before the server has checked its certificate
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        return await asyncio.wait_for(reader.read(64), 5)
    except (ssl.SSLError, ConnectionError) as exc:
        return exc
    finally:
        writer.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_mtls_refuses_a_stranger_certificate_in_the_handshake(
    start_server, tmp_path, rest, version
):
    ca, clients = trustme.CA(), trustme.CA()
    aggregator, _ = await start_server(server={"tls": server_tls(tmp_path, ca, clients)})
    stranger = trustme.CA().issue_cert("billing.internal")
    refused = await _first_bytes(aggregator.port, ca, stranger, version)
    assert refused == b"" or isinstance(refused, (ssl.SSLError, ConnectionError)), refused
    member = clients.issue_cert("billing.internal")
    accepted = await _first_bytes(aggregator.port, ca, member, version)
    assert isinstance(accepted, bytes)
    assert accepted[3:4] == b"\x04"  # an HTTP/2 SETTINGS frame: the same client, let in
    assert rest.recorder.requests == []


# Not yet checked (b): a caller that opens a stream and never reads. grpc's flow control makes
# context.write wait once the caller's window is full, so the server holds at most the
# call's own results (max_targets x max_response_bytes), never more. Before, with no deadline
# from the caller, it held them, and the call's slot, for as long as the caller stayed
# connected (measured: 3 such calls of 100 x 1 MiB held 330 MiB past the 5 s budget, until the
# caller went away). Now the call ends at its budget: DEADLINE_EXCEEDED.
async def test_a_caller_that_never_reads_is_cut_at_the_budget(start_server, big):
    aggregator, _ = await start_server(server={"default_deadline": "1s"}, big=big_upstream(big))
    targets = [http(f"t{i}", f"/{i}", upstream="big") for i in range(30)]
    async with big_channel(aggregator.port) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        calls = [stub.Aggregate(pb.AggregateRequest(targets=targets)) for _ in range(2)]
        for call in calls:
            await call.initial_metadata()  # the calls are in; none is read
        started = time.perf_counter()
        service = aggregator._service
        for _ in range(1000):  # bounded: 10 s at most
            if not service.inflight:
                break
            await asyncio.sleep(0.01)
        held = time.perf_counter() - started
        assert service.inflight == 0
        # Cut at the 1 s budget; without the cut a call is held for as long as its caller
        # stays. The bound leaves room for a loaded machine.
        assert held < 6
        for call in calls:
            results, code, details, trailers = await collect(call)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "did not read its results within the call's budget (1000ms)" in details
            # The write waited for the caller: only what its window took had been written.
            assert len(results) < len(targets)
            assert int(trailers["x-aggregate-succeeded"]) <= len(results) + 1
