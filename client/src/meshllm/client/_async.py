"""AsyncClient: the asyncio client. ``Client`` (in ``_sync``) is its blocking twin."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from meshllm.api.errors import MeshError, from_rpc_error
from meshllm.api.tls import ChannelTLS, channel
from meshllm.api.tracing import ending, inject, tracer
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client._convert import build_request, chunk_from_pb, completion_from_pb, model_from_pb
from meshllm.client._types import BatchItem, Completion, ModelInfo, Prompt, StreamChunk

PromptArg = str | Sequence[Mapping[str, str]] | None


class AsyncClient:
    """Client for a meshllm router or replica (both serve ``meshllm.api.v1.Generation``).

    Args:
      target: ``host:port`` of the router (or of one replica, for development).
      api_key: sent as ``authorization: Bearer <key>``; outside local development only over TLS.
      timeout: default deadline per call, in seconds (None: no deadline).
      tls: ``ChannelTLS`` (CA, client certificate for mutual TLS, server name), or True for TLS
        that trusts the system's root certificates; None or False: plaintext.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        tls: ChannelTLS | bool | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.tls = ChannelTLS() if tls is True else tls or None
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub_obj: gen_grpc.GenerationStub | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub_obj = None

    def _stub(self) -> gen_grpc.GenerationStub:
        if self._stub_obj is None:
            self._channel = channel(self.target, self.tls)
            self._stub_obj = gen_grpc.GenerationStub(self._channel)
        return self._stub_obj

    async def generate(
        self, prompt: PromptArg = None, *, model: str, timeout: float | None = None, **fields: Any
    ) -> Completion:
        """Generate a whole reply. ``fields``: max_tokens, temperature, stop, token_ids, ... ."""
        req = build_request(prompt, model=model, **fields)
        span = tracer.start_span(
            "meshllm.client/Generate", kind=SpanKind.CLIENT, attributes={"meshllm.model": model}
        )
        with ending(span):
            try:
                resp = await self._stub().Generate(
                    req, timeout=self._timeout(timeout), metadata=(*self._metadata, *inject(span))
                )
            except grpc.aio.AioRpcError as e:
                raise from_rpc_error(e) from None
        return completion_from_pb(resp)

    async def stream(
        self, prompt: PromptArg = None, *, model: str, timeout: float | None = None, **fields: Any
    ) -> AsyncIterator[StreamChunk]:
        """Stream a reply chunk by chunk; leaving the loop early cancels generation."""
        req = build_request(prompt, model=model, **fields)
        span = tracer.start_span("meshllm.client/GenerateStream", kind=SpanKind.CLIENT,
                                 attributes={"meshllm.model": model})  # fmt: skip
        call = self._stub().GenerateStream(
            req, timeout=self._timeout(timeout), metadata=(*self._metadata, *inject(span))
        )
        try:
            with ending(span):
                async for msg in call:
                    yield chunk_from_pb(msg)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        try:
            resp = await self._stub().ListModels(
                gen.ListModelsRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        return [model_from_pb(m) for m in resp.models]

    async def generate_batch(
        self,
        prompts: Iterable[Prompt],
        *,
        model: str,
        concurrency: int = 32,
        on_result: Callable[[int, Completion | None, MeshError | None], None] | None = None,
        **fields: Any,
    ) -> list[BatchItem]:
        """Generate for every prompt with at most ``concurrency`` in flight.

        Results come back in input order; a failed item carries its error instead of raising.
        Each prompt is text, a chat (list of {role, content}), or a dict of request fields.
        """
        results: dict[int, BatchItem] = {}
        window = asyncio.Semaphore(concurrency)

        async def one(index: int, item: Prompt) -> None:
            try:
                kwargs = (
                    {**fields, **item} if isinstance(item, dict) else {**fields, "prompt": item}
                )
                completion: Completion | None = await self.generate(model=model, **kwargs)
                error: MeshError | None = None
            except MeshError as e:
                completion, error = None, e
            finally:
                window.release()
            results[index] = BatchItem(index=index, result=completion, error=error)
            if on_result is not None:
                on_result(index, completion, error)

        tasks = []
        for index, item in enumerate(prompts):
            await window.acquire()
            tasks.append(asyncio.create_task(one(index, item)))
        await asyncio.gather(*tasks)
        return [results[i] for i in range(len(results))]

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout
