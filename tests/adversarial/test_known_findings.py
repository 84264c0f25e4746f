"""Issue 23's findings on cost (#1, #3, #4), each the smallest request that shows it, under the
harness's bounds. Those not fixed yet are xfail(strict=True, raises=BoundExceeded): they fail
only on the bound the finding breaks, and flip to a failure the day the fix lands (then the
mark goes)."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import struct_pb2

from aggregator.v1 import aggregator_pb2 as pb
from tests.adversarial.conftest import Adversary, answer, assert_clean
from tests.adversarial.watch import BoundExceeded
from tests.conftest import http

# issue 23 #1: a dependency's value substituted many times ----------------------------------

BIG_VALUE = 1_000_000  # under max_response_bytes (1 MiB)
COPIES = 64  # the 256 made a 256 MB path; 64 still stalls the loop for hundreds of ms


def big_value_dependency(adversary: Adversary) -> tuple[pb.Target, int]:
    """Target ``d``, answered ``{"s": "a" x BIG_VALUE}`` by the raw upstream; its size."""
    body = json.dumps({"s": "a" * BIG_VALUE}).encode()
    adversary.raw.scripts["/big"] = [answer(body)]
    return http("d", "/big", upstream="raw"), len(body)


def dependents_of_d(where: str) -> pb.Target:
    references = "{{d.s}}" * COPIES
    if where == "path":
        return http("use", "/echo/" + references, depends_on=["d"])
    body = struct_pb2.Value()
    body.struct_value.update({"v": references})
    return http("use", "/echo", method="POST", json=body, depends_on=["d"])


@pytest.mark.xfail(
    strict=True,
    raises=BoundExceeded,
    reason="issue 23 #1: substituted values are built in full before the size check",
)
@pytest.mark.parametrize("where", ["path", "json"])
async def test_a_value_substituted_many_times_stops_at_the_fields_cap(
    adversary: Adversary, where: str
) -> None:
    dependency, size = big_value_dependency(adversary)
    request = pb.AggregateRequest(targets=[dependency, dependents_of_d(where)])
    outcome = await adversary.call(request, answered_bytes=size)
    assert outcome.code == grpc.StatusCode.OK
    use = outcome.by_id()["use"]
    assert use.outcome == pb.OUTCOME_ERROR
    assert adversary.rest.recorder.requests == []  # the grown request never left


# issue 23 #3: planning walks caller JSON on the loop, and past max_targets --------------------

# 100 KB of {} in a target (the 400 KB stalled 1.7 s), 300 KB in a parameter (its
# 4 MB stalled 5.1 s): 3 to 4 times the bound today.
EMPTY_OBJECTS = {"http.json": 25_000, "grpc.json": 25_000, "params": 75_000}


def empty_objects(count: int) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.list_value.values.extend(
        struct_pb2.Value(struct_value=struct_pb2.Struct()) for _ in range(count)
    )
    return value


def json_targets(where: str) -> pb.AggregateRequest:
    objects = empty_objects(EMPTY_OBJECTS[where])
    if where == "http.json":
        return pb.AggregateRequest(targets=[http("j", "/echo", method="POST", json=objects)])
    if where == "grpc.json":
        call = pb.GrpcCall(upstream="shop", method="/shop.v1.Catalog/Echo")
        attributes = struct_pb2.Value()
        attributes.struct_value.fields["many"].CopyFrom(objects)
        call.json.struct_value.fields["attributes"].CopyFrom(attributes)
        return pb.AggregateRequest(targets=[pb.Target(id="j", grpc=call)])
    params = struct_pb2.Struct()
    params.fields["ids"].CopyFrom(objects)
    return pb.AggregateRequest(aggregate="lookup", params=params)


@pytest.mark.xfail(
    strict=True,
    raises=BoundExceeded,
    reason="issue 23 #3: planning converts caller JSON on the loop before checking its size",
)
@pytest.mark.parametrize("where", ["http.json", "grpc.json", "params"])
async def test_a_large_json_payload_is_planned_without_stalling_the_loop(
    adversary: Adversary, where: str
) -> None:
    request = json_targets(where)
    outcome = await adversary.call(request, answered_bytes=request.ByteSize())
    assert outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
    assert_clean(request, outcome)


PAST_MAX_TARGETS = 10_000  # the 140,000 stalled 5.8 s


@pytest.mark.xfail(
    strict=True,
    raises=BoundExceeded,
    reason="issue 23 #3: every target past server.max_targets is planned before the refusal",
)
async def test_targets_past_max_targets_are_refused_before_planning(adversary: Adversary) -> None:
    request = pb.AggregateRequest(
        targets=[http(f"t{i}", "/echo/x") for i in range(PAST_MAX_TARGETS)]
    )
    outcome = await adversary.call(request)
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceed server.max_targets (100)" in outcome.details
    assert adversary.rest.recorder.requests == []


# issue 23 #4: a decode_json dependency that is not JSON, read by many dependents -------------

NOT_JSON = b"[" + b"0," * 500_000 + b"x"  # 1 MB that fails at its last byte
READERS = 16  # the 99 stalled 3.8 s


async def test_a_body_that_is_not_json_is_parsed_once_for_all_its_dependents(
    adversary: Adversary,
) -> None:
    adversary.raw.scripts["/not-json"] = [answer(NOT_JSON)]
    readers = [http(f"r{i}", "/echo/{{d.0}}", depends_on=["d"]) for i in range(READERS)]
    dependency = http("d", "/not-json", upstream="raw", decode_json=True)
    request = pb.AggregateRequest(targets=[dependency, *readers])
    outcome = await adversary.call(request, answered_bytes=len(NOT_JSON))
    assert outcome.code == grpc.StatusCode.OK
    for reader in readers:
        assert outcome.by_id()[reader.id].outcome == pb.OUTCOME_ERROR
    assert adversary.rest.recorder.requests == []
