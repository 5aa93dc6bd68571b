"""Servers' tracing set-up honours the standard OTEL_* variables: which exporters, which OTLP
protocol, off by default and when disabled; the resource names the service and its version."""

from __future__ import annotations

from importlib import metadata

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)

from meshllm.api.tracing import rpc_attributes
from meshllm.server.tracing import span_processors, tracer_provider

ENDPOINT = "http://127.0.0.1:1"  # nothing listens: no span is exported in these tests


def exporters(env: dict[str, str]) -> list[type]:
    processors = span_processors(env)
    try:
        return [type(p.span_exporter) for p in processors]  # type: ignore[attr-defined]
    finally:
        for p in processors:
            p.shutdown()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, []),  # off by default
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, [GrpcExporter]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ENDPOINT}, [GrpcExporter]),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, [GrpcExporter]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, [GrpcExporter]),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            [HttpExporter],
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            },
            [HttpExporter],  # the per-signal variable wins
        ),
        ({"OTEL_TRACES_EXPORTER": "console"}, [ConsoleSpanExporter]),
        ({"OTEL_TRACES_EXPORTER": "console, otlp"}, [ConsoleSpanExporter, GrpcExporter]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ENDPOINT}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, []),
    ],
)
def test_exporters_follow_the_environment(env: dict[str, str], expected: list[type]) -> None:
    assert exporters(env) == expected


def test_an_exporter_it_cannot_make_is_named_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    assert exporters({"OTEL_TRACES_EXPORTER": "zipkin,console"}) == [ConsoleSpanExporter]
    assert "'zipkin'" in caplog.text
    assert exporters({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "x"}) == []
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='x' is not supported" in caplog.text


def test_console_spans_are_written_as_they_end() -> None:
    (processor,) = span_processors({"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(processor, SimpleSpanProcessor)
    (batched,) = span_processors({"OTEL_TRACES_EXPORTER": "otlp"})
    assert isinstance(batched, BatchSpanProcessor)
    batched.shutdown()  # type: ignore[no-untyped-call]


def test_the_resource_names_the_service_and_its_version() -> None:
    provider = tracer_provider("meshllm-router", {"OTEL_TRACES_EXPORTER": "console"})
    assert isinstance(provider, TracerProvider)
    attributes = provider.resource.attributes
    assert attributes["service.name"] == "meshllm-router"
    assert attributes["service.version"] == metadata.version("meshllm-router")
    named = tracer_provider(
        "meshllm-replica", {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "gpu-pool-a"}
    )
    assert named is not None and named.resource.attributes["service.name"] == "gpu-pool-a"
    assert named.resource.attributes["service.version"] == metadata.version("meshllm-replica")
    assert tracer_provider("meshllm-router", {}) is None
    for p in (provider, named):
        p.shutdown()


@pytest.mark.parametrize(
    ("target", "address", "port"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051),
        ("dns:///router.svc:443", "router.svc", 443),
        ("[::1]:50061", "::1", 50061),
        ("router", "router", None),
        ("", None, None),
    ],
)
def test_rpc_attributes_name_the_server(target: str, address: str | None, port: int | None) -> None:
    attributes = rpc_attributes("Generate", target)
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "meshllm.api.v1.Generation"
    assert attributes["rpc.method"] == "Generate"
    assert attributes.get("server.address") == address
    assert attributes.get("server.port") == port
