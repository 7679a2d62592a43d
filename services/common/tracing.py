"""OpenTelemetry tracing for every role, configured by the standard ``OTEL_*`` variables.

Tracing is on when an OTLP endpoint is given (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and neither ``OTEL_SDK_DISABLED=true`` nor
``OTEL_TRACES_EXPORTER=none`` says otherwise; spans then go to that endpoint over OTLP/gRPC
through a batch processor. Otherwise nothing is set up and every helper here is a cheap no-op.

One request is one trace across the roles (W3C trace context):
- HTTP -> gateway: the ``traceparent`` header (if any) is the parent of the gateway's span;
- gateway -> attention: ``traceparent`` in the gRPC metadata;
- attention -> expert: the 16-byte trace id and 8-byte span id fields of the libm2n header. A
  dispatch carries rows of several requests; it carries the context of the first traced request
  of its micro-batch, and the expert's span links to the contexts of the other dispatches it
  computed in the same group.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C header / metadata keys
_ZERO_TRACE = bytes(16)
_provider = None


def tracing_requested() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup_tracing(service_name: str) -> bool:
    """Install the global tracer provider for this process; True when tracing is on."""
    global _provider
    if _provider is not None or not tracing_requested():
        return _provider is not None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME", service_name)
    _provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporter (call once at process exit)."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def enabled() -> bool:
    return _provider is not None


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def context_from_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]
                         ) -> otel_context.Context:
    """Extract a W3C context from HTTP headers or gRPC metadata pairs."""
    carrier = dict(headers.items() if isinstance(headers, Mapping) else headers)
    return _PROPAGATOR.extract(carrier)


def inject_headers(ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    """``traceparent``/``tracestate`` pairs for the current (or given) context."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return list(carrier.items())


def span_ids(span: trace.Span) -> tuple[bytes, bytes] | None:
    """(trace id 16 bytes, span id 8 bytes) of a recording span, for the libm2n header."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    return sc.trace_id.to_bytes(16, "big"), sc.span_id.to_bytes(8, "big")


def context_from_ids(trace_id: bytes, span_id: bytes) -> otel_context.Context | None:
    """The remote parent carried by a libm2n header, or None when it carries none."""
    if trace_id == _ZERO_TRACE:
        return None
    sc = SpanContext(int.from_bytes(trace_id, "big"), int.from_bytes(span_id, "big"),
                     is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(sc))
