"""OpenTelemetry tracing shared by client, router and replica: one trace from the client's call
to the engine, joined through W3C ``traceparent`` gRPC metadata.

Only the OpenTelemetry API is required: until a tracer provider is configured, every span is a
no-op (no cost) that still passes an incoming trace context on. Servers configure the SDK and an
OTLP exporter from the standard environment variables (``OTEL_TRACES_EXPORTER=otlp``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``, ...) when the ``tracing`` extra is
installed. Spans are started and ended explicitly, never made "current": streaming handlers are
async generators, which cannot hold a context across their yields.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

from opentelemetry import propagate, trace
from opentelemetry.context import Context

from meshllm.api.errors import status_name

log = logging.getLogger(__name__)
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


def configure_from_env(service_name: str) -> bool:
    """Install the SDK with an OTLP exporter when the environment asks for it; True if it did."""
    wants = os.environ.get("OTEL_TRACES_EXPORTER", "") == "otlp" or bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    if not wants or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTLP tracing asked for by OTEL_* variables, but the 'tracing' extra is not installed"
        )
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans over OTLP as %s", resource.attributes["service.name"])
    return True
