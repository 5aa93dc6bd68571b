"""The public ``Generation`` service on a replica."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from meshllm.api import convert as api_convert
from meshllm.api.bounds import UNKNOWN_MODEL_LABEL
from meshllm.api.convert import model_info_to_pb
from meshllm.api.tracing import (
    child_of,
    end_with_error,
    extract,
    generation_attributes,
    rpc_attributes,
    tracer,
    usage_attributes,
)
from meshllm.api.types import Timing, Usage
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.replica import convert
from meshllm.replica.host import Replica
from meshllm.replica.validation import check_identity
from meshllm.server.metrics import RequestMetrics, RequestRecord
from meshllm.server.serving import streaming, unary

Context = grpc.aio.ServicerContext[Any, Any]


def engine_spans(parent: trace.Span, timing: Timing, usage: Usage) -> None:
    """The replica's phases, from the request's own timing: waiting for an engine slot, then
    generating (time to first token and token count as attributes)."""
    now = time.time_ns()
    admitted = now - int(timing.total_ms * 1e6)
    started = admitted + int(timing.queue_wait_ms * 1e6)
    tracer.start_span("meshllm.replica/queue", context=child_of(parent), start_time=admitted).end(
        end_time=started
    )
    engine = tracer.start_span(
        "meshllm.engine/generate",
        context=child_of(parent),
        start_time=started,
        attributes={
            "meshllm.time_to_first_token_ms": timing.time_to_first_token_ms,
            "meshllm.completion_tokens": usage.completion_tokens,
            "meshllm.prompt_tokens": usage.prompt_tokens,
        },
    )
    engine.end(end_time=now)


class GenerationService(gen_grpc.GenerationServicer):
    def __init__(self, replica: Replica, metrics: RequestMetrics) -> None:
        self._replica, self._metrics = replica, metrics

    async def _chunks(
        self, request: gen.GenerateRequest, context: Context, method: str
    ) -> AsyncGenerator[gen.GenerateChunk]:
        req = convert.request_from_pb(request)
        span = tracer.start_span(
            "meshllm.replica/generate",
            context=extract(context.invocation_metadata()),
            kind=SpanKind.SERVER,
            attributes={
                "meshllm.replica": self._replica.name,
                **rpc_attributes(method),
                **generation_attributes(request),
                "gen_ai.request.model": self._model_label(req.model),  # bounded, not as sent
            },
        )

        def end_span(record: RequestRecord) -> None:
            span.set_attributes(
                usage_attributes(
                    record.finish_reason, record.prompt_tokens, record.completion_tokens
                )
            )
            end_with_error(span, record.code)

        with self._metrics.track(self._model_label(req.model), on_end=end_span) as record:
            record.replica = self._replica.name
            check_identity(req)  # before the id goes into the log line and the span
            record.request_id = req.request_id
            span.set_attribute("meshllm.request_id", req.request_id)
            async for chunk in self._replica.generate(req):
                record.tokens(len(chunk.token_ids))
                if chunk.usage is not None:
                    record.prompt_tokens = chunk.usage.prompt_tokens
                if chunk.finish_reason is not None:
                    record.finish_reason = chunk.finish_reason.value
                if chunk.timing is not None and chunk.usage is not None:
                    record.decode_s = chunk.timing.decode_ms / 1e3
                    engine_spans(span, chunk.timing, chunk.usage)
                yield convert.chunk_to_pb(chunk, req.request_id)

    def _model_label(self, model: str) -> str:
        """The metrics label of a request for ``model``: the loaded model's id (an empty model
        means it), else one value for every other name a caller sends."""
        spec = self._replica.spec
        if spec is not None and model in ("", spec.id):
            return spec.id
        return UNKNOWN_MODEL_LABEL

    @streaming
    async def GenerateStream(
        self, request: gen.GenerateRequest, context: Context
    ) -> AsyncGenerator[gen.GenerateChunk]:
        async for chunk in self._chunks(request, context, "GenerateStream"):
            yield chunk

    @unary
    async def Generate(
        self, request: gen.GenerateRequest, context: Context
    ) -> gen.GenerateResponse:
        chunks = [c async for c in self._chunks(request, context, "Generate")]
        return api_convert.response_from_chunks(chunks)

    @unary
    async def ListModels(
        self, request: gen.ListModelsRequest, context: Context
    ) -> gen.ListModelsResponse:
        return gen.ListModelsResponse(models=[model_info_to_pb(m) for m in self._replica.models()])
