"""The public ``Generation`` service on the router: the same contract as a replica's."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

import grpc

from meshllm.api import convert
from meshllm.api.types import ModelInfo
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.router.admission import Headers
from meshllm.router.auth import Authenticator
from meshllm.router.forward import Forwarder
from meshllm.router.registry import Registry, Replica
from meshllm.router.request import Call
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
        models = [convert.model_info_to_pb(listed(m, ready[m])) for m in sorted(ready)]
        return gen.ListModelsResponse(models=models)


def listed(model: str, replicas: list[Replica]) -> ModelInfo:
    """A model as the mesh serves it: its limits as a replica resolved them, and how many serve it."""
    served = next(
        (r.served for r in replicas if r.served is not None and r.served.id == model), None
    )
    if served is None:
        return ModelInfo(
            id=model, engine="", context_length=0, max_tokens_limit=0, ready_replicas=len(replicas)
        )
    return replace(served.info, ready_replicas=len(replicas))
