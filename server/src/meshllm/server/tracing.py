"""OpenTelemetry SDK setup for servers: spans exported over OTLP when the standard ``OTEL_*``
variables ask for it and the ``tracing`` extra is installed. Clients only need the API
(``meshllm.api.tracing``)."""

from __future__ import annotations

import logging
import os

from opentelemetry import trace

log = logging.getLogger(__name__)


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
