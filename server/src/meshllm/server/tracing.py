"""OpenTelemetry SDK setup for servers, from the standard ``OTEL_*`` variables, when the
``tracing`` extra is installed. Clients only need the API (``meshllm.api.tracing``).

- ``OTEL_TRACES_EXPORTER``: a comma-separated list of ``otlp``, ``console``, ``none``. Unset, a
  server exports over OTLP only when an ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set, and
  does not trace otherwise (tracing is off by default).
- ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``: ``grpc`` (the default, port 4317) or
  ``http/protobuf`` (port 4318). Endpoint, headers, TLS and timeouts are read by the exporters.
- ``OTEL_SDK_DISABLED=true`` keeps tracing off whatever the rest says.
- The resource carries ``service.name`` (``OTEL_SERVICE_NAME``, else the command's name),
  ``service.version`` (the installed distribution's) and ``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib import metadata
from typing import TYPE_CHECKING

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

log = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http/protobuf")


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for, in order (empty: no tracing)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    listed = env.get("OTEL_TRACES_EXPORTER", "").strip()
    if not listed:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [n.strip().lower() for n in listed.split(",") if n.strip()]
    return [] if "none" in names else names


def otlp_protocol(env: Mapping[str, str]) -> str:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    return protocol.strip().lower()


def span_processors(env: Mapping[str, str]) -> list[SpanProcessor]:
    """One processor per exporter asked for; a name or protocol this server cannot export to
    is logged and skipped (the server still starts)."""
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    processors: list[SpanProcessor] = []
    for name in exporter_names(env):
        if name == "console":  # as each span ends: a person is reading
            processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp" and otlp_protocol(env) == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "otlp" and otlp_protocol(env) == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as OTLPHttpSpanExporter,
            )

            processors.append(BatchSpanProcessor(OTLPHttpSpanExporter()))
        elif name == "otlp":
            log.warning(
                "tracing: OTEL_EXPORTER_OTLP_PROTOCOL=%r is not supported (use one of %s); "
                "not exporting over OTLP",
                otlp_protocol(env),
                ", ".join(PROTOCOLS),
            )
        else:
            log.warning(
                "tracing: OTEL_TRACES_EXPORTER names %r; supported: otlp, console, none", name
            )
    return processors


def service_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def tracer_provider(service_name: str, env: Mapping[str, str]) -> TracerProvider | None:
    """The SDK tracer provider the environment asks for, or None for no tracing."""
    if not exporter_names(env):
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        log.warning(
            "tracing asked for by OTEL_* variables, but the 'tracing' extra is not installed"
        )
        return None
    processors = span_processors(env)
    if not processors:
        return None
    resource = Resource.create(
        {
            "service.name": env.get("OTEL_SERVICE_NAME") or service_name,
            "service.version": service_version(service_name),
        }
    )
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def configure_from_env(service_name: str) -> bool:
    """Install the tracer provider the environment asks for; True if it did. ``service_name``
    is the command's, which is also its distribution's name (``meshllm-router``)."""
    provider = tracer_provider(service_name, os.environ)
    if provider is None:
        return False
    trace.set_tracer_provider(provider)
    log.info(
        "tracing: exporting spans (%s) as %s",
        ", ".join(exporter_names(os.environ)),
        provider.resource.attributes["service.name"],
    )
    return True
