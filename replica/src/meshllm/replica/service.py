"""The public ``Generation`` service on a replica."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc

from meshllm.api.metrics import RequestMetrics
from meshllm.api.serving import streaming, unary
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.replica import convert
from meshllm.replica.host import Replica

Context = grpc.aio.ServicerContext[Any, Any]


class GenerationService(gen_grpc.GenerationServicer):
    def __init__(self, replica: Replica, metrics: RequestMetrics) -> None:
        self._replica, self._metrics = replica, metrics

    async def _chunks(self, request: gen.GenerateRequest) -> AsyncGenerator[gen.GenerateChunk]:
        req = convert.request_from_pb(request)
        spec = self._replica.spec
        with self._metrics.track(req.model or (spec.id if spec else ""), req.request_id) as record:
            record.replica = self._replica.name
            async for chunk in self._replica.generate(req):
                record.tokens(len(chunk.token_ids))
                if chunk.usage is not None:
                    record.prompt_tokens = chunk.usage.prompt_tokens
                yield convert.chunk_to_pb(chunk, req.request_id)

    @streaming
    async def GenerateStream(
        self, request: gen.GenerateRequest, context: Context
    ) -> AsyncGenerator[gen.GenerateChunk]:
        async for chunk in self._chunks(request):
            yield chunk

    @unary
    async def Generate(
        self, request: gen.GenerateRequest, context: Context
    ) -> gen.GenerateResponse:
        chunks = [c async for c in self._chunks(request)]
        return convert.response_from_chunks(chunks)

    @unary
    async def ListModels(
        self, request: gen.ListModelsRequest, context: Context
    ) -> gen.ListModelsResponse:
        return gen.ListModelsResponse(
            models=[convert.model_info_to_pb(m) for m in self._replica.models()]
        )
