"""OpenTelemetry tracing shared by client, router and replica: one trace from the client's call
to the engine, joined through W3C ``traceparent`` gRPC metadata.

Only the OpenTelemetry API is required: until a tracer provider is configured, every span is a
no-op (no cost) that still passes an incoming trace context on. Servers configure the SDK and an
OTLP exporter from the standard ``OTEL_*`` variables (``meshllm.server.tracing``). Spans are started and ended explicitly, never made "current": streaming handlers are
async generators, which cannot hold a context across their yields.

Attributes follow OpenTelemetry's semantic conventions where one exists: RPC (``rpc.system``,
``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code`` as the integer code,
``server.address``/``server.port`` on client spans) and GenAI (``gen_ai.operation.name``,
``gen_ai.request.*``, ``gen_ai.response.finish_reasons``, ``gen_ai.usage.*``); the rest are
``meshllm.*``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.util.types import AttributeValue

from meshllm.api.errors import status_name
from meshllm.api.v1 import generation_pb2 as gen

tracer = trace.get_tracer("meshllm")

Metadata = Iterable[tuple[str, str | bytes]]
Attributes = dict[str, AttributeValue]

GENERATION_SERVICE = gen.DESCRIPTOR.services_by_name["Generation"].full_name


def rpc_attributes(method: str, server: str = "") -> Attributes:
    """A call of ``Generation/<method>``; ``server`` (a client span's target, ``host:port``)
    gives ``server.address`` and ``server.port``."""
    attributes: Attributes = {
        "rpc.system": "grpc",
        "rpc.service": GENERATION_SERVICE,
        "rpc.method": method,
    }
    host, _, port = server.removeprefix("dns:///").removeprefix("ipv4:").rpartition(":")
    if not port.isdigit():
        host, port = server, ""
    if host:
        attributes["server.address"] = host.strip("[]")
    if port:
        attributes["server.port"] = int(port)
    return attributes


def generation_attributes(request: gen.GenerateRequest) -> Attributes:
    """What was asked: chat or completion, of which model, with which sampling limits (only
    those the request sets; never its text)."""
    attributes: Attributes = {
        "gen_ai.operation.name": "chat" if request.messages else "text_completion",
        "gen_ai.request.model": request.model,
    }
    for field in ("max_tokens", "temperature", "top_p", "top_k"):
        if request.HasField(field):
            attributes[f"gen_ai.request.{field}"] = getattr(request, field)
    return attributes


def usage_attributes(finish_reason: str, input_tokens: int, output_tokens: int) -> Attributes:
    """What the reply was: how it ended (absent when it never ended: an error, a cancel) and
    its token counts."""
    attributes: Attributes = {
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
    }
    if finish_reason:
        attributes["gen_ai.response.finish_reasons"] = (finish_reason,)
    return attributes


def finish_reason_name(reason: gen.FinishReason) -> str:
    """``stop``, ``length``, ... for a wire finish reason; empty for UNSPECIFIED."""
    if reason == gen.FINISH_REASON_UNSPECIFIED:
        return ""
    return gen.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


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
    """End ``span`` with the gRPC status named ``code`` (``OK``, ``NOT_FOUND``, ...)."""
    status = grpc.StatusCode.__members__.get(code, grpc.StatusCode.UNKNOWN)
    span.set_attribute("rpc.grpc.status_code", status.value[0])
    if code != "OK":
        span.set_status(trace.Status(trace.StatusCode.ERROR, message or code))
    span.end()
