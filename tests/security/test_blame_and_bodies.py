"""Issue 23, the upstream slice: blame goes where it belongs (#2, #14), a body never becomes a
request (#8), an upstream's grpc-message is cleaned (#13). Real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http import server as http_server
from typing import Any

import grpc
from google.protobuf import struct_pb2

from aggregator.lifecycle import AggregatorServer
from aggregator.v1 import aggregator_pb2 as pb
from tests.conftest import collect, http


async def aggregate(stub: Any, *targets: pb.Target, timeout: float = 5) -> Any:
    return await collect(
        stub.Aggregate(pb.AggregateRequest(targets=list(targets)), timeout=timeout)
    )


def sample(server: AggregatorServer, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# #2: a caller's unreadable gRPC request is not the upstream's failure ---------------------------


@contextlib.asynccontextmanager
async def typed_grpc_upstream() -> AsyncIterator[str]:
    """A gRPC server whose method reads a google.protobuf.Value: other bytes get grpc's own
    answer for a request it cannot deserialize."""

    async def echo(request: struct_pb2.Value, context: Any) -> struct_pb2.Value:
        return request

    handler = grpc.unary_unary_rpc_method_handler(
        echo,
        request_deserializer=struct_pb2.Value.FromString,
        response_serializer=struct_pb2.Value.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Values", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def value_target(target_id: str, request: bytes) -> pb.Target:
    call = pb.GrpcCall(upstream="values", method="/t.Values/Echo", request=request)
    return pb.Target(id=target_id, grpc=call)


async def test_unreadable_grpc_requests_neither_open_the_breaker_nor_eject_endpoints(
    start_server: Any,
) -> None:
    async with typed_grpc_upstream() as one, typed_grpc_upstream() as two:
        server, stub = await start_server(
            values={
                "kind": "grpc",
                "address": [one, two],
                "circuit_breaker": {"fail_max": 3, "reset_timeout": "30s"},
                "outlier_detection": {"consecutive_failures": 2},
            }
        )
        garbage = [value_target(f"bad{i}", b"\xff\xff\xff\xff") for i in range(10)]
        results, _, _, _ = await aggregate(stub, *garbage)
        assert all(r.outcome == pb.OUTCOME_ERROR for r in results), results
        assert all("Error parsing message" in r.error for r in results)
        assert sample(server, "aggregator_circuit_state", upstream="values") == 0
        assert sample(server, "aggregator_endpoint_ejections_total", upstream="values") == 0
        good = struct_pb2.Value(string_value="hi").SerializeToString()
        results, _, _, _ = await aggregate(stub, value_target("good", good))
        assert results[0].outcome == pb.OUTCOME_OK, results[0].error


# #2: a timeout that fired because this process was late is not the upstream's ------------------


@contextlib.contextmanager
def threaded_http_upstream(handler: type[http_server.BaseHTTPRequestHandler]) -> Iterator[Any]:
    """A real HTTP/1.1 server on its own thread: it answers while our event loop is stalled."""
    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class _Prompt(http_server.BaseHTTPRequestHandler):
    """Answers every GET after 50 ms; counts the requests that arrived."""

    protocol_version = "HTTP/1.1"
    arrived = threading.Semaphore(0)

    def do_GET(self) -> None:
        type(self).arrived.release()
        time.sleep(0.05)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


async def test_a_timeout_that_fired_while_our_loop_stalled_is_not_held_against_the_upstream(
    start_server: Any,
) -> None:
    class Prompt(_Prompt):
        arrived = threading.Semaphore(0)

    with threaded_http_upstream(Prompt) as upstream:
        url = f"http://127.0.0.1:{upstream.server_address[1]}"
        server, stub = await start_server(
            prompt={
                "kind": "http",
                "url": url,
                "timeout": "300ms",
                "circuit_breaker": {"fail_max": 2, "reset_timeout": "30s"},
            }
        )
        targets = [http(f"t{i}", "/", upstream="prompt") for i in range(3)]
        call = asyncio.create_task(aggregate(stub, *targets))
        for _ in targets:
            assert await asyncio.to_thread(Prompt.arrived.acquire, timeout=5)
        time.sleep(0.6)  # noqa: ASYNC251  the subject: our event loop stalls past the timeout
        results, _, _, _ = await call
        stalled = [r for r in results if r.outcome == pb.OUTCOME_TIMEOUT]
        assert stalled, results  # the alarm fired first, late
        assert all("late" in r.error for r in stalled), stalled
        assert sample(server, "aggregator_circuit_state", upstream="prompt") == 0
        results, _, _, _ = await aggregate(stub, http("after", "/", upstream="prompt"))
        assert results[0].outcome == pb.OUTCOME_OK, results[0].error


# #8: a body that an upstream did not read never becomes a request -----------------------------

SMUGGLED = b"DELETE /admin/users/1 HTTP/1.1\r\nHost: upstream\r\nContent-Length: 0\r\n\r\n"


class _Refusing(http_server.BaseHTTPRequestHandler):
    """Answers 401 at once, without reading the body (as an auth check before an upload
    does); records every request it parses, and when a connection ends."""

    protocol_version = "HTTP/1.1"
    parsed: list[str] = []
    ended = threading.Semaphore(0)

    def do_POST(self) -> None:
        self._refuse()

    def do_DELETE(self) -> None:
        self._refuse()

    def _refuse(self) -> None:
        type(self).parsed.append(f"{self.command} {self.path}")
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def finish(self) -> None:
        super().finish()
        type(self).ended.release()

    def log_message(self, *args: Any) -> None:
        pass


async def test_a_post_body_the_upstream_did_not_read_is_never_executed(start_server: Any) -> None:
    class Refusing(_Refusing):
        parsed: list[str] = []
        ended = threading.Semaphore(0)

    with threaded_http_upstream(Refusing) as upstream:
        url = f"http://127.0.0.1:{upstream.server_address[1]}"
        _, stub = await start_server(legacy={"kind": "http", "url": url})
        target = http("ack", "/public/ack", upstream="legacy", method="POST", body=SMUGGLED)
        results, _, _, _ = await aggregate(stub, target)
        assert results[0].http_status == 401
        assert await asyncio.to_thread(Refusing.ended.acquire, timeout=5)  # connection over
        assert Refusing.parsed == ["POST /public/ack"]


# #13: an upstream's grpc-message is cleaned -----------------------------------------------------


async def test_an_upstreams_grpc_message_reaches_the_result_cleaned(start_server: Any) -> None:
    async def refuse(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "bad\r\nx-injected: 1\x1b[31m")
        raise AssertionError("unreachable")

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(refuse)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Values", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        _, stub = await start_server(values={"kind": "grpc", "address": f"127.0.0.1:{port}"})
        results, _, _, _ = await aggregate(stub, value_target("a", b""))
        error = results[0].error
        assert "bad x-injected: 1" in error, error
        assert not any(ch in error for ch in "\r\n\x1b"), repr(error)
    finally:
        await server.stop(None)


# #14: one caller's wide calls to a slow path do not shrink a shared limit ----------------------


async def test_one_callers_slow_calls_move_an_adaptive_limit_by_its_share_only(
    start_server: Any, rest: Any
) -> None:
    server, stub = await start_server(
        shared={"kind": "http", "url": rest.url, "max_concurrency": "auto", "adaptive_max": 40},
        server={"address": "127.0.0.1:0", "metrics_address": "", "max_targets": 100},
    )

    def limit() -> float:
        return sample(server, "aggregator_upstream_concurrency_limit", upstream="shared")

    for _ in range(4):  # the normal load: the limit grows to its maximum
        await aggregate(stub, *(http(f"w{i}", "/delay/10", upstream="shared") for i in range(40)))
    assert limit() == 40
    attacking = True

    async def normal_traffic() -> None:  # other callers' calls go on meanwhile
        while attacking:
            await aggregate(
                stub, *(http(f"n{i}", "/delay/10", upstream="shared") for i in range(5))
            )

    others = asyncio.create_task(normal_traffic())
    for _ in range(6):  # one caller, six calls of 40 targets on a slow path
        await aggregate(stub, *(http(f"s{i}", "/delay/200", upstream="shared") for i in range(40)))
    attacking = False
    await others
    assert limit() >= 28, limit()  # one call lowers it one smoothed step at most (22 without)
