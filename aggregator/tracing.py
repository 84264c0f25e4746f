"""Tracing with OpenTelemetry: an optional extra (``pip install .[otel]``), off unless configured.

One span per aggregate (kind SERVER, continued from the caller's W3C ``traceparent``) and one per
upstream attempt (kind CLIENT), whose context goes upstream as ``traceparent``/``tracestate``
HTTP headers or gRPC metadata. The attempt spans are children of the aggregate span through
contextvars: the target tasks copy the context they are created in.

Without the extra, or with tracing off, every function here is a cheap no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

_tracer: Tracer | None = None  # set by enable(); None means tracing is off


def enable(provider: Any) -> None:
    """Turns tracing on with an OpenTelemetry ``TracerProvider``."""
    global _tracer
    _tracer = provider.get_tracer("aggregator")


def disable() -> None:
    global _tracer
    _tracer = None


def provider_for(exporter: str, endpoint: str, service_name: str, sample_ratio: float) -> Any:
    """An SDK TracerProvider exporting in batches to ``exporter`` (otlp or console)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter: Any = OTLPSpanExporter(endpoint=endpoint or None)
    else:
        span_exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider


def aggregate_span(
    method: str, request_id: str, metadata: Iterable[tuple[str, Any]]
) -> contextlib.AbstractContextManager[Span | None]:
    """The span of one Aggregate/Collect call, continuing the caller's trace if it sent one."""
    if _tracer is None:
        return _OFF  # the hot path: no generator-based context manager when tracing is off
    return _aggregate_span(method, request_id, metadata)


@contextlib.contextmanager
def _aggregate_span(
    method: str, request_id: str, metadata: Iterable[tuple[str, Any]]
) -> Iterator[Span | None]:
    assert _tracer is not None
    from opentelemetry import propagate, trace

    carrier = {key: value for key, value in metadata if isinstance(value, str)}
    with _tracer.start_as_current_span(
        f"aggregator.v1.Aggregator/{method}",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": "aggregator.v1.Aggregator",
            "rpc.method": method,
            "aggregator.request_id": request_id,
        },
    ) as span:
        yield span


def attempt_span(upstream: str, kind: str) -> contextlib.AbstractContextManager[Span | None]:
    """The span of one attempt to ``upstream``; current while the attempt runs."""
    if _tracer is None:
        return _OFF  # the hot path: no generator-based context manager when tracing is off
    return _attempt_span(upstream, kind)


_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


@contextlib.contextmanager
def _attempt_span(upstream: str, kind: str) -> Iterator[Span | None]:
    assert _tracer is not None
    from opentelemetry import trace

    with _tracer.start_as_current_span(
        f"{upstream} attempt",
        kind=trace.SpanKind.CLIENT,
        attributes={"aggregator.upstream": upstream, "aggregator.upstream_kind": kind},
    ) as span:
        yield span


def annotate(span: Span | None, attributes: Mapping[str, Any]) -> None:
    if span is not None:
        span.set_attributes(dict(attributes))


def outgoing() -> tuple[tuple[str, str], ...]:
    """``traceparent``/``tracestate`` of the current span, to send upstream (empty when off)."""
    if _tracer is None:
        return ()
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())
