"""OpenTelemetry tracing shared by client, router and replica: one trace from the client's call
to the engine, joined through W3C ``traceparent`` gRPC metadata.

Only the OpenTelemetry API is required: until a tracer provider is configured, every span is a
no-op (no cost) that still passes an incoming trace context on. Servers configure the SDK and an
OTLP exporter from the standard ``OTEL_*`` variables (``meshllm.server.tracing``). Spans are started and ended explicitly, never made "current": streaming handlers are
async generators, which cannot hold a context across their yields.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from opentelemetry import propagate, trace
from opentelemetry.context import Context

from meshllm.api.errors import status_name

tracer = trace.get_tracer("meshllm")

Metadata = Iterable[tuple[str, str | bytes]]


def extract(metadata: Metadata | None) -> Context:
    """The caller's trace context from incoming gRPC metadata (empty if none)."""
    carrier = {k: v for k, v in metadata or () if isinstance(v, str)}
    return propagate.extract(carrier)


def inject(span: trace.Span) -> tuple[tuple[str, str], ...]:
    """Outgoing gRPC metadata that makes ``span`` the parent of the callee's spans."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=child_of(span))
    return tuple(carrier.items())


def child_of(span: trace.Span) -> Context:
    return trace.set_span_in_context(span)


@contextlib.contextmanager
def ending(span: trace.Span) -> Iterator[trace.Span]:
    """End ``span`` when the block ends, with the status code its exception (if any) means."""
    try:
        yield span
    except BaseException as e:
        end_with_error(span, status_name(e))
        raise
    end_with_error(span, "OK")


def end_with_error(span: trace.Span, code: str, message: str = "") -> None:
    span.set_attribute("rpc.grpc.status_code", code)
    if code != "OK":
        span.set_status(trace.Status(trace.StatusCode.ERROR, message or code))
    span.end()
