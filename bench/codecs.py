"""The JSON mapping's cost per gRPC target, in process: ``python -m bench.codecs``.

One grpc5-json target's conversions, on the bench's ``/bench.v1.Quotes/Get`` (bench/quote.py):
its QuoteRequest encoded from JSON (as a Value's numbers arrive: floats) and its Quote answer
decoded to JSON. Three ways, alternating in each repeat so drift hits all alike: json_format
(ParseDict + SerializeToString, ParseFromString + MessageToDict, what the aggregator did before
its compiled codecs and what the naive peer does), the aggregator's MethodSchema (compiled
codecs, aggregator/codecs.py), and the bytes path (parsing the answer only: what grpc5-bytes
does not even do). Prints CPU µs (process time: other processes on the machine do not count)
per encode+decode, the median and min of the repeats.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor_pb2, json_format

from aggregator.schema import MethodSchema, Schema
from bench import quote

ROUNDS = 500  # conversions per timing
REPEATS = 11


def _schema() -> MethodSchema:
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(
            quote.pool().FindFileByName(name).serialized_pb
        )
        for name in ("google/protobuf/timestamp.proto", "bench/v1/quote.proto")
    ]
    method = Schema(files, origin="bench").find(quote.METHOD)
    assert method is not None
    return method


def ways() -> dict[str, Callable[[], Any]]:
    """Each way's one target: encode the request, decode the answer."""
    method = _schema()
    request = {k: float(v) if isinstance(v, int) else v for k, v in quote.request_json(20).items()}
    answer = quote.answer()
    request_class, answer_class = quote.message_class("QuoteRequest"), quote.message_class("Quote")

    def json_format_way() -> Any:
        json_format.ParseDict(request, request_class()).SerializeToString()
        return json_format.MessageToDict(answer_class.FromString(answer))

    def compiled_way() -> Any:
        method.encode(request)
        return method.decode(answer)

    def bytes_way() -> Any:
        return answer_class.FromString(answer)

    assert compiled_way() == json_format_way()
    assert (
        method.encode(request)
        == json_format.ParseDict(request, request_class()).SerializeToString()
    )
    return {"json_format": json_format_way, "compiled": compiled_way, "bytes": bytes_way}


def measure() -> dict[str, dict[str, float]]:
    timed = ways()
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(REPEATS):
        for name, way in timed.items():
            began = time.process_time()
            for _ in range(ROUNDS):
                way()
            samples[name].append((time.process_time() - began) / ROUNDS * 1e6)
    return {
        name: {"median_us": round(statistics.median(s), 1), "min_us": round(min(s), 1)}
        for name, s in samples.items()
    }


def main() -> None:
    figures = measure()
    print(json.dumps(figures))
    for name, figure in figures.items():
        print(f"{name:12} {figure['median_us']:7.1f} us median  {figure['min_us']:7.1f} us min")


if __name__ == "__main__":
    main()
