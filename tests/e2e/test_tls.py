"""TLS and mTLS against real loopback servers with certificates made by the test (trustme):
the server, its plaintext health-only port, certificate rotation, and TLS to upstreams."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import pytest
import trustme
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.config import ConfigError, config_from_mapping
from aggregator.security import files
from aggregator.v1 import aggregator_pb2 as pb
from aggregator.v1 import aggregator_pb2_grpc as pb_grpc
from tests.conftest import collect, http, rpc_target
from tests.upstreams import tls_grpc_upstream, tls_rest_upstream


def write_ca(directory: Path, ca: trustme.CA, name: str = "ca") -> str:
    path = directory / f"{name}.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def write_leaf(directory: Path, leaf: trustme.LeafCert, name: str) -> tuple[str, str]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def server_tls(
    directory: Path, ca: trustme.CA, client_ca: trustme.CA | None = None
) -> dict[str, str]:
    cert, key = write_leaf(directory, ca.issue_cert("127.0.0.1", "localhost"), "server")
    tls = {"cert": cert, "key": key}
    if client_ca is not None:
        tls["client_ca"] = write_ca(directory, client_ca, "client-ca")
    return tls


def credentials(ca: trustme.CA, client: trustme.LeafCert | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(ca.cert_pem.bytes())
    return grpc.ssl_channel_credentials(
        ca.cert_pem.bytes(),
        client.private_key_pem.bytes(),
        b"".join(blob.bytes() for blob in client.cert_chain_pems),
    )


async def aggregate_over(
    port: int, channel_credentials: grpc.ChannelCredentials, *targets: pb.Target
) -> tuple[list[pb.TargetResult], grpc.StatusCode, str]:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", channel_credentials) as channel:
        stub = pb_grpc.AggregatorStub(channel)
        request = pb.AggregateRequest(targets=list(targets) or [http("a", "/echo")])
        results, code, details, _ = await collect(stub.Aggregate(request, timeout=5))
    return results, code, details


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_server_serves_aggregate(start_server, tmp_path, ca, rest):
    aggregator, _ = await start_server(server={"tls": server_tls(tmp_path, ca)})
    results, code, _ = await aggregate_over(aggregator.port, credentials(ca))
    assert code == grpc.StatusCode.OK
    assert [r.outcome for r in results] == [pb.OUTCOME_OK]
    assert len(rest.recorder.requests) == 1


async def test_plaintext_client_cannot_reach_a_tls_server(start_server, tmp_path, ca, rest):
    _, plaintext_stub = await start_server(server={"tls": server_tls(tmp_path, ca)})
    request = pb.AggregateRequest(targets=[http("a", "/echo")])
    _, code, _, _ = await collect(plaintext_stub.Aggregate(request, timeout=2))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert rest.recorder.requests == []


async def test_client_trusting_another_ca_refuses_the_server(start_server, tmp_path, ca):
    aggregator, _ = await start_server(server={"tls": server_tls(tmp_path, ca)})
    _, code, _ = await aggregate_over(aggregator.port, credentials(trustme.CA()))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate(start_server, tmp_path, ca, rest):
    clients = trustme.CA()
    aggregator, _ = await start_server(server={"tls": server_tls(tmp_path, ca, clients)})
    _, code, _ = await aggregate_over(aggregator.port, credentials(ca))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert rest.recorder.requests == []


async def test_mtls_refuses_a_certificate_from_another_ca(start_server, tmp_path, ca, rest):
    clients = trustme.CA()
    aggregator, _ = await start_server(server={"tls": server_tls(tmp_path, ca, clients)})
    stranger = trustme.CA().issue_cert("billing.internal")
    _, code, _ = await aggregate_over(aggregator.port, credentials(ca, stranger))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert rest.recorder.requests == []


async def test_mtls_accepts_a_certificate_from_the_client_ca(start_server, tmp_path, ca):
    clients = trustme.CA()
    aggregator, _ = await start_server(server={"tls": server_tls(tmp_path, ca, clients)})
    client = clients.issue_cert("billing.internal")
    results, code, _ = await aggregate_over(aggregator.port, credentials(ca, client))
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_OK


async def test_health_port_is_plaintext_and_serves_health_only(start_server, tmp_path, ca):
    clients = trustme.CA()
    tls = server_tls(tmp_path, ca, clients)
    aggregator, _ = await start_server(server={"tls": tls, "health_address": "127.0.0.1:0"})
    assert aggregator.health_port not in (0, aggregator.port)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{aggregator.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "aggregator.v1.Aggregator"):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        request = pb.AggregateRequest(targets=[http("a", "/echo")])
        call = pb_grpc.AggregatorStub(channel).Aggregate(request, timeout=5)
        _, code, _, _ = await collect(call)
        assert code == grpc.StatusCode.UNIMPLEMENTED


async def test_health_port_reports_not_serving_while_draining(start_server):
    aggregator, _ = await start_server(server={"health_address": "127.0.0.1:0"})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{aggregator.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        await aggregator._health.enter_graceful_shutdown()
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


async def test_server_certificate_rotates_without_restart(start_server, tmp_path, ca, monkeypatch):
    monkeypatch.setattr(files, "CHECK_INTERVAL", 0.0)
    tls = server_tls(tmp_path, ca)
    aggregator, _ = await start_server(server={"tls": tls})
    assert (await aggregate_over(aggregator.port, credentials(ca)))[1] == grpc.StatusCode.OK
    renewed = trustme.CA()
    write_leaf(tmp_path, renewed.issue_cert("127.0.0.1"), "server")
    _, code, _ = await aggregate_over(aggregator.port, credentials(renewed))
    assert code == grpc.StatusCode.OK
    _, code, _ = await aggregate_over(aggregator.port, credentials(ca))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_half_written_rotation_keeps_the_last_good_certificate(
    start_server, tmp_path, ca, monkeypatch
):
    monkeypatch.setattr(files, "CHECK_INTERVAL", 0.0)
    tls = server_tls(tmp_path, ca)
    aggregator, _ = await start_server(server={"tls": tls})
    # The new certificate is in place, its key not yet: the pair does not match.
    trustme.CA().issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(tls["cert"])
    _, code, _ = await aggregate_over(aggregator.port, credentials(ca))
    assert code == grpc.StatusCode.OK


def upstream_server_context(ca: trustme.CA, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def test_https_upstream_verified_with_the_configured_ca(start_server, stub, tmp_path, ca):
    async with tls_rest_upstream(upstream_server_context(ca)) as upstream:
        secure = {"kind": "http", "url": f"https://127.0.0.1:{upstream.port}"}
        _, stub = await start_server(secure={**secure, "tls": {"ca": write_ca(tmp_path, ca)}})
        request = pb.AggregateRequest(targets=[http("a", "/echo/x", upstream="secure")])
        results, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_OK
    assert [seen["path"] for seen in upstream.recorder.requests] == ["/echo/x"]


async def test_https_upstream_with_an_untrusted_certificate_is_unavailable(start_server, ca):
    async with tls_rest_upstream(upstream_server_context(ca)) as upstream:
        _, stub = await start_server(
            secure={"kind": "http", "url": f"https://127.0.0.1:{upstream.port}"}
        )
        request = pb.AggregateRequest(targets=[http("a", "/echo", upstream="secure")])
        results, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_UNAVAILABLE
    assert "could not verify secure's TLS certificate" in results[0].error
    assert "certificate" in results[0].error.split(":", 1)[1]
    assert upstream.recorder.requests == []


async def test_https_upstream_requiring_a_client_certificate(start_server, tmp_path, ca):
    clients = trustme.CA()
    cert, key = write_leaf(tmp_path, clients.issue_cert("aggregator.internal"), "client")
    ca_path = write_ca(tmp_path, ca)
    mutual = {"ca": ca_path, "cert": cert, "key": key}
    async with tls_rest_upstream(upstream_server_context(ca, clients)) as upstream:
        url = f"https://127.0.0.1:{upstream.port}"
        _, stub = await start_server(
            with_cert={"kind": "http", "url": url, "tls": mutual},
            without={"kind": "http", "url": url, "tls": {"ca": ca_path}},
        )
        request = pb.AggregateRequest(
            targets=[
                http("with", "/echo", upstream="with_cert"),
                http("without", "/echo", upstream="without"),
            ]
        )
        results, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
    outcomes = {r.id: r.outcome for r in results}
    assert code == grpc.StatusCode.OK
    assert outcomes == {"with": pb.OUTCOME_OK, "without": pb.OUTCOME_UNAVAILABLE}
    assert len(upstream.recorder.requests) == 1


async def test_grpc_upstream_over_tls(start_server, tmp_path, ca):
    leaf = ca.issue_cert("127.0.0.1")
    server_credentials = grpc.ssl_server_credentials(
        [(leaf.private_key_pem.bytes(), leaf.cert_chain_pems[0].bytes())]
    )
    async with tls_grpc_upstream(server_credentials) as upstream:
        _, stub = await start_server(
            secure={
                "kind": "grpc",
                "address": upstream.address,
                "tls": {"ca": write_ca(tmp_path, ca)},
            },
            plain={"kind": "grpc", "address": upstream.address},
        )
        request = pb.AggregateRequest(
            targets=[
                rpc_target("tls", "Echo", b"over tls", upstream="secure"),
                rpc_target("plain", "Echo", b"in clear", upstream="plain", timeout=_seconds(1)),
            ]
        )
        results, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
    by_id = {r.id: r for r in results}
    assert code == grpc.StatusCode.OK
    assert by_id["tls"].outcome == pb.OUTCOME_OK
    assert by_id["tls"].body == b"over tls"
    assert by_id["plain"].outcome in (pb.OUTCOME_UNAVAILABLE, pb.OUTCOME_TIMEOUT)
    assert [seen["request"] for seen in upstream.recorder.requests] == [b"over tls"]


async def test_grpc_upstream_mtls_with_a_client_certificate(start_server, tmp_path, ca):
    clients = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    server_credentials = grpc.ssl_server_credentials(
        [(leaf.private_key_pem.bytes(), leaf.cert_chain_pems[0].bytes())],
        root_certificates=clients.cert_pem.bytes(),
        require_client_auth=True,
    )
    cert, key = write_leaf(tmp_path, clients.issue_cert("aggregator.internal"), "client")
    tls = {"ca": write_ca(tmp_path, ca), "cert": cert, "key": key}
    async with tls_grpc_upstream(server_credentials) as upstream:
        _, stub = await start_server(
            secure={"kind": "grpc", "address": upstream.address, "tls": tls}
        )
        request = pb.AggregateRequest(targets=[rpc_target("a", "Echo", b"hi", upstream="secure")])
        results, code, _, _ = await collect(stub.Aggregate(request, timeout=5))
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_OK


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def test_watched_files_reload_on_change_and_keep_the_last_good_value(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "CHECK_INTERVAL", 0.0)
    path = tmp_path / "value"
    path.write_text("1")

    def load() -> int:
        return int(path.read_text())

    watched = files.Watched("test value", [str(path)], load)
    assert (watched.current(), watched.generation) == (1, 1)
    path.write_text("22")
    assert (watched.current(), watched.generation) == (22, 2)
    path.write_text("half-written")
    assert (watched.current(), watched.generation) == (22, 2)
    path.write_text("333")
    assert (watched.current(), watched.generation) == (333, 3)
    assert repr(watched) == "<Watched test value [generation 3, 1 files]>"


def config_problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(raw)
    return caught.value.problems


def test_server_tls_files_are_checked_at_start(tmp_path, ca):
    tls = server_tls(tmp_path, ca)
    (tmp_path / "other").mkdir()
    other = server_tls(tmp_path / "other", trustme.CA())
    problems = config_problems({"server": {"tls": {"cert": tls["cert"], "key": other["key"]}}})
    assert problems == [
        f"server.tls.key: {other['key']} is not the private key of the certificate in {tls['cert']}"
    ]
    problems = config_problems(
        {"server": {"tls": {"cert": str(tmp_path / "missing.crt"), "client_ca": tls["key"]}}}
    )
    assert problems == [
        "server.tls.key: required",
        f"server.tls.cert: {tmp_path / 'missing.crt'}: cannot read: No such file or directory",
        f"server.tls.client_ca: {tls['key']}: holds no PEM certificate",
    ]


def test_upstream_tls_problems_name_their_keys(tmp_path, ca):
    cert, _ = write_leaf(tmp_path, ca.issue_cert("x"), "client")
    problems = config_problems(
        {
            "upstreams": {
                "plain": {"kind": "http", "url": "http://a", "tls": {}},
                "half": {"kind": "grpc", "address": "a:1", "tls": {"cert": cert}},
            }
        }
    )
    assert problems == [
        "upstreams.plain.tls: needs an https:// url",
        "upstreams.half.tls: cert and key go together",
    ]
