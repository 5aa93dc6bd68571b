"""The public ``Generation`` service on the router: the same contract as a replica's."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from meshllm.api.serving import streaming, unary
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.router.convert import model_info_to_pb
from meshllm.router.forward import Forwarder
from meshllm.router.registry import Registry

Context = grpc.aio.ServicerContext[Any, Any]


class RouterGenerationService(gen_grpc.GenerationServicer):
    def __init__(self, forwarder: Forwarder, registry: Registry) -> None:
        self._forwarder, self._registry = forwarder, registry

    @streaming
    async def GenerateStream(
        self, request: gen.GenerateRequest, context: Context
    ) -> AsyncGenerator[gen.GenerateChunk]:
        chunks = self._forwarder.stream(
            request, context.time_remaining, context.invocation_metadata()
        )
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    @unary
    async def Generate(
        self, request: gen.GenerateRequest, context: Context
    ) -> gen.GenerateResponse:
        return await self._forwarder.generate(
            request, context.time_remaining, context.invocation_metadata()
        )

    @unary
    async def ListModels(
        self, request: gen.ListModelsRequest, context: Context
    ) -> gen.ListModelsResponse:
        ready = self._registry.ready_models()
        return gen.ListModelsResponse(
            models=[model_info_to_pb(model, ready[model]) for model in sorted(ready)]
        )
