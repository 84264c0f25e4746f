"""Per-upstream policies against real, misbehaving upstreams: retries, budget, hedging,
circuit breaker, bulkhead, rate limit, fallbacks and timeouts."""

from __future__ import annotations

import grpc

from aggregator.v1 import aggregator_pb2 as pb
from tests.clocks import ManualClock
from tests.conftest import collect, http, rpc_target, wait_for
from tests.upstreams import RestUpstream, refused_port, unanswered_port

RETRY = {"attempts": 3, "backoff": "1ms", "max_backoff": "5ms"}


def flaky_upstream(rest: RestUpstream, **policies: object) -> dict[str, object]:
    return {"kind": "http", "url": rest.url, **policies}


async def aggregate(stub, *targets: pb.Target, timeout: float = 5):
    return await collect(
        stub.Aggregate(pb.AggregateRequest(targets=list(targets)), timeout=timeout)
    )


async def test_get_is_retried_until_it_succeeds(start_server, rest):
    _, stub = await start_server(flaky=flaky_upstream(rest, retry=RETRY))
    results, code, _, _ = await aggregate(stub, http("a", "/flaky/a/2", upstream="flaky"))
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_OK
    assert results[0].attempts == 3
    assert rest.recorder.counts["a"] == 3


async def test_retries_stop_at_the_configured_attempts(start_server, rest):
    _, stub = await start_server(flaky=flaky_upstream(rest, retry=RETRY))
    results, _, _, _ = await aggregate(stub, http("a", "/flaky/a/10", upstream="flaky"))
    assert results[0].outcome == pb.OUTCOME_ERROR
    assert results[0].http_status == 503
    assert results[0].attempts == 3
    assert rest.recorder.counts["a"] == 3


async def test_post_without_idempotency_key_is_tried_once(start_server, rest):
    _, stub = await start_server(flaky=flaky_upstream(rest, retry=RETRY))
    results, _, _, _ = await aggregate(
        stub, http("a", "/flaky/a/1", upstream="flaky", method="POST")
    )
    assert results[0].outcome == pb.OUTCOME_ERROR
    assert results[0].attempts == 1
    assert rest.recorder.counts["a"] == 1


async def test_post_with_idempotency_key_is_retried(start_server, rest):
    _, stub = await start_server(flaky=flaky_upstream(rest, retry=RETRY))
    target = http(
        "a", "/flaky/a/1", upstream="flaky", method="POST", headers={"Idempotency-Key": "k1"}
    )
    results, _, _, _ = await aggregate(stub, target)
    assert results[0].outcome == pb.OUTCOME_OK
    assert results[0].attempts == 2
    assert [r["headers"]["idempotency-key"] for r in rest.recorder.requests] == ["k1", "k1"]


async def test_client_errors_are_not_retried(start_server, rest):
    _, stub = await start_server(flaky=flaky_upstream(rest, retry=RETRY))
    results, _, _, _ = await aggregate(
        stub, http("a", "/flaky/a/1", upstream="flaky", query={"code": "404"})
    )
    assert results[0].http_status == 404
    assert results[0].attempts == 1


async def test_connection_refused_is_retried_then_unavailable(start_server):
    gone = {"kind": "http", "url": f"http://127.0.0.1:{refused_port()}", "retry": RETRY}
    _, stub = await start_server(gone=gone)
    results, _, _, _ = await aggregate(stub, http("a", "/x", upstream="gone"))
    assert results[0].outcome == pb.OUTCOME_UNAVAILABLE
    assert results[0].attempts == 3


async def test_retry_after_that_fits_the_deadline_is_honoured(start_server, rest):
    _, stub = await start_server(flaky=flaky_upstream(rest, retry=RETRY))
    target = http("a", "/flaky/a/1", upstream="flaky", query={"code": "429", "retry_after": "1"})
    results, _, _, _ = await aggregate(stub, target, timeout=3)
    assert results[0].outcome == pb.OUTCOME_OK
    assert results[0].attempts == 2
    assert results[0].latency.ToMilliseconds() >= 1000


async def test_retry_after_past_the_deadline_is_not_waited_for(start_server, rest):
    _, stub = await start_server(flaky=flaky_upstream(rest, retry=RETRY))
    target = http("a", "/flaky/a/1", upstream="flaky", query={"code": "429", "retry_after": "5"})
    results, _, _, trailers = await aggregate(stub, target, timeout=1)
    assert results[0].http_status == 429
    assert results[0].attempts == 1
    assert float(trailers["x-aggregate-elapsed-ms"]) < 500


async def test_retries_never_run_past_the_deadline(start_server, rest):
    slow_retry = {"attempts": 50, "backoff": "100ms", "max_backoff": "100ms"}
    _, stub = await start_server(flaky=flaky_upstream(rest, retry=slow_retry))
    results, code, _, trailers = await aggregate(
        stub, http("a", "/flaky/a/1000", upstream="flaky"), timeout=0.5
    )
    assert code == grpc.StatusCode.OK
    assert results[0].outcome == pb.OUTCOME_ERROR
    assert 1 <= results[0].attempts < 50  # stopped by the deadline, not by attempts
    assert float(trailers["x-aggregate-elapsed-ms"]) < 500


async def test_retry_budget_caps_retries_in_a_full_outage(start_server, rest):
    budget = {**RETRY, "budget": 0.1, "min_retries_per_second": 0.5}
    _, stub = await start_server(
        server={"max_targets": 200}, flaky=flaky_upstream(rest, retry=budget)
    )
    targets = [http(f"t{i}", f"/flaky/t{i}/100", upstream="flaky") for i in range(100)]
    results, _, _, _ = await aggregate(stub, *targets, timeout=10)
    retries = sum(r.attempts - 1 for r in results)
    hits = len(rest.recorder.requests)
    # Without the budget: 200 retries. With it: 10% of 100 requests plus a floor of 5.
    assert retries == hits - 100
    assert retries <= 15


async def test_grpc_is_retried_on_unavailable_only(start_server, rpc):
    _, stub = await start_server(retrying={"kind": "grpc", "address": rpc.address, "retry": RETRY})
    unavailable = rpc_target("u", "FailFirst", b"u:2:14", upstream="retrying")
    not_found = rpc_target("n", "FailFirst", b"n:1:5", upstream="retrying")
    results, _, _, _ = await aggregate(stub, unavailable, not_found)
    by_id = {r.id: r for r in results}
    assert by_id["u"].outcome == pb.OUTCOME_OK
    assert by_id["u"].attempts == 3
    assert by_id["n"].outcome == pb.OUTCOME_ERROR
    assert by_id["n"].grpc_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert by_id["n"].attempts == 1


async def test_hedge_answers_from_the_second_attempt_and_cancels_the_first(start_server, rest):
    _, stub = await start_server(hedged=flaky_upstream(rest, hedge={"delay": "50ms"}))
    results, _, _, _ = await aggregate(stub, http("a", "/slow-first/a", upstream="hedged"))
    assert results[0].outcome == pb.OUTCOME_OK
    assert results[0].attempts == 2
    assert rest.recorder.counts["a"] == 2
    await wait_for(rest.recorder.cancelled)


async def test_no_hedge_when_the_first_attempt_is_fast(start_server, rest):
    _, stub = await start_server(hedged=flaky_upstream(rest, hedge={"delay": "500ms"}))
    results, _, _, _ = await aggregate(stub, http("a", "/delay/1", upstream="hedged"))
    assert results[0].attempts == 1
    assert len(rest.recorder.requests) == 1


async def test_post_is_never_hedged(start_server, rest):
    _, stub = await start_server(hedged=flaky_upstream(rest, hedge={"delay": "20ms"}))
    target = http("a", "/slow-first/a", upstream="hedged", method="POST")
    target.timeout.FromMilliseconds(200)
    results, _, _, _ = await aggregate(stub, target)
    assert results[0].outcome == pb.OUTCOME_TIMEOUT
    assert results[0].attempts == 1
    assert rest.recorder.counts["a"] == 1


def circuit_state(server, upstream: str) -> float | None:
    return server.metrics.registry.get_sample_value(
        "aggregator_circuit_state", {"upstream": upstream}
    )


async def test_breaker_opens_fails_fast_half_opens_with_one_trial_and_closes(start_server, rest):
    breaker = {"fail_max": 3, "reset_timeout": "300ms"}
    # The trial below times out by the upstream's own timeout: a caller's own shorter
    # timeout would say nothing of the upstream's health, and not count (docs/security.md).
    flaky = flaky_upstream(rest, circuit_breaker=breaker, timeout="300ms")
    clock = ManualClock()
    server, stub = await start_server(flaky=flaky, clock=clock)
    for i in range(3):
        results, _, _, _ = await aggregate(stub, http(f"f{i}", "/status/500", upstream="flaky"))
        assert results[0].outcome == pb.OUTCOME_ERROR
    assert circuit_state(server, "flaky") == 2

    results, _, _, _ = await aggregate(stub, http("fast", "/delay/1", upstream="flaky"))
    assert results[0].outcome == pb.OUTCOME_CIRCUIT_OPEN
    assert results[0].attempts == 0
    assert "circuit breaker for flaky is open" in results[0].error
    assert len(rest.recorder.requests) == 3  # nothing reached the network

    clock.advance(0.299)
    results, _, _, _ = await aggregate(stub, http("early", "/delay/1", upstream="flaky"))
    assert results[0].outcome == pb.OUTCOME_CIRCUIT_OPEN  # not a moment before reset_timeout
    clock.advance(0.002)  # the breaker's clock, past reset_timeout
    trial = http("trial", "/hang", upstream="flaky")
    others = [http(f"o{i}", "/delay/1", upstream="flaky") for i in range(4)]
    results, _, _, _ = await aggregate(stub, trial, *others)
    by_id = {r.id: r for r in results}
    assert by_id["trial"].outcome == pb.OUTCOME_TIMEOUT  # the one trial, which failed
    assert all(by_id[f"o{i}"].outcome == pb.OUTCOME_CIRCUIT_OPEN for i in range(4))
    assert len(rest.recorder.requests) == 4
    assert circuit_state(server, "flaky") == 2

    clock.advance(0.301)
    results, _, _, _ = await aggregate(stub, http("ok", "/delay/1", upstream="flaky"))
    assert results[0].outcome == pb.OUTCOME_OK
    assert circuit_state(server, "flaky") == 0
    results, _, _, _ = await aggregate(
        stub, *(http(f"a{i}", "/delay/1", upstream="flaky") for i in range(3))
    )
    assert all(r.outcome == pb.OUTCOME_OK for r in results)


async def test_client_errors_do_not_open_the_breaker(start_server, rest):
    breaker = {"fail_max": 2, "reset_timeout": "30s"}
    server, stub = await start_server(flaky=flaky_upstream(rest, circuit_breaker=breaker))
    targets = [http(f"t{i}", "/status/404", upstream="flaky") for i in range(5)]
    results, _, _, _ = await aggregate(stub, *targets)
    assert all(r.http_status == 404 for r in results)
    assert circuit_state(server, "flaky") == 0


async def test_bulkhead_bounds_concurrent_calls(start_server, rest):
    _, stub = await start_server(bounded=flaky_upstream(rest, max_concurrency=3))
    targets = [http(f"t{i}", "/delay/30", upstream="bounded") for i in range(12)]
    results, _, _, _ = await aggregate(stub, *targets)
    assert all(r.outcome == pb.OUTCOME_OK for r in results)
    assert rest.recorder.max_inflight == 3


async def test_bulkhead_rejects_what_cannot_get_a_slot_in_time(start_server, rest):
    _, stub = await start_server(bounded=flaky_upstream(rest, max_concurrency=1))
    holder = http("holder", "/hang", upstream="bounded")
    holder.timeout.FromMilliseconds(400)
    waiter = http("waiter", "/delay/1", upstream="bounded")
    waiter.timeout.FromMilliseconds(100)
    results, _, _, _ = await aggregate(stub, holder, waiter)
    by_id = {r.id: r for r in results}
    assert by_id["waiter"].outcome == pb.OUTCOME_REJECTED
    assert "max_concurrency" in by_id["waiter"].error
    assert len(rest.recorder.requests) == 1


async def test_rate_limit_waits_within_the_deadline_else_rejects(start_server, rest):
    limited = flaky_upstream(rest, rate_limit={"rate": 10, "burst": 2})
    _, stub = await start_server(limited=limited)
    targets = [http(f"t{i}", "/delay/1", upstream="limited") for i in range(6)]
    results, _, _, _ = await aggregate(stub, *targets, timeout=0.35)
    outcomes = sorted(pb.Outcome.Name(r.outcome) for r in results)
    # Burst 2 at once, then one every 100 ms: 2 more fit in the ~330 ms left.
    assert outcomes.count("OUTCOME_OK") in (4, 5)
    assert outcomes.count("OUTCOME_REJECTED") == 6 - outcomes.count("OUTCOME_OK")
    assert len(rest.recorder.requests) == outcomes.count("OUTCOME_OK")


async def test_fallback_of_a_timed_out_required_target(start_server, rest):
    _, stub = await start_server()
    target = http("slow", "/hang", required=True)
    target.fallback.string_value = "later"
    results, code, _, trailers = await aggregate(stub, target, timeout=0.3)
    assert code == grpc.StatusCode.OK
    assert results[0].from_fallback
    assert results[0].json.string_value == "later"
    assert "deadline" in results[0].error
    assert trailers["x-aggregate-fallback"] == "slow"
    assert trailers["x-aggregate-timed-out"] == ""


async def test_connect_timeout_is_unavailable_and_says_so(start_server):
    with unanswered_port() as port:
        stuck = {"kind": "http", "url": f"http://127.0.0.1:{port}", "connect_timeout": "100ms"}
        _, stub = await start_server(stuck=stuck)
        results, _, _, trailers = await aggregate(stub, http("a", "/x", upstream="stuck"))
    assert results[0].outcome == pb.OUTCOME_UNAVAILABLE
    assert "connect_timeout 100ms" in results[0].error
    assert float(trailers["x-aggregate-elapsed-ms"]) < 1000
