"""The public ``Generation`` service on the router: the same contract as a replica's."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.router.admission import Headers
from meshllm.router.auth import Authenticator
from meshllm.router.convert import model_info_to_pb
from meshllm.router.forward import Call, Forwarder
from meshllm.router.registry import Registry
from meshllm.server.serving import streaming, unary

Context = grpc.aio.ServicerContext[Any, Any]


def incoming(auth: Authenticator, context: Context) -> Call:
    """Authenticate a call: its tenant, deadline, metadata and a way to send headers."""
    metadata = context.invocation_metadata()

    async def send_headers(headers: Headers) -> None:
        if headers:
            await context.send_initial_metadata(headers)

    return Call(auth.authenticate(metadata), context.time_remaining, metadata, send_headers)


class RouterGenerationService(gen_grpc.GenerationServicer):
    def __init__(self, forwarder: Forwarder, registry: Registry, auth: Authenticator) -> None:
        self._forwarder, self._registry, self._auth = forwarder, registry, auth

    @streaming
    async def GenerateStream(
        self, request: gen.GenerateRequest, context: Context
    ) -> AsyncGenerator[gen.GenerateChunk]:
        chunks = self._forwarder.stream(request, incoming(self._auth, context))
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    @unary
    async def Generate(
        self, request: gen.GenerateRequest, context: Context
    ) -> gen.GenerateResponse:
        return await self._forwarder.generate(request, incoming(self._auth, context))

    @unary
    async def ListModels(
        self, request: gen.ListModelsRequest, context: Context
    ) -> gen.ListModelsResponse:
        self._auth.authenticate(context.invocation_metadata())
        ready = self._registry.ready_models()
        return gen.ListModelsResponse(
            models=[model_info_to_pb(model, ready[model]) for model in sorted(ready)]
        )
