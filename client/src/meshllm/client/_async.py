"""AsyncClient: the asyncio client. ``Client`` (in ``_sync``) is its blocking twin."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from meshllm.api.errors import from_rpc_error
from meshllm.api.tls import ChannelTLS
from meshllm.api.tracing import ending, generation_attributes, inject, rpc_attributes, tracer
from meshllm.api.types import ModelInfo
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client._batch import BatchOptions, BatchRunner, Prepared, Refused
from meshllm.client._cache import ResponseCache, cache_key
from meshllm.client._connection import Connected, Connection
from meshllm.client._convert import (
    build_request,
    canonical_request,
    chunk_from_pb,
    completion_from_pb,
    deterministic,
    models_from_pb,
)
from meshllm.client._options import (
    USE_CLIENT_DEFAULT,
    CallTimeout,
    RequestFields,
    TimeoutArg,
    resolve_timeout,
)
from meshllm.client._pacing import RateLimits, parse_rate_limits
from meshllm.client._types import BatchItem, Completion, Prompt, StreamChunk, cut_short

PromptArg = str | Sequence[Mapping[str, str]] | None
CacheArg = str | os.PathLike[str] | ResponseCache | None
DEFAULT_BATCH = BatchOptions()


class AsyncClient(Connected[gen_grpc.GenerationStub]):
    """Client for a meshllm router or replica (both serve ``meshllm.api.v1.Generation``).

    Args:
      target: ``host:port`` of the router (or of one replica, for development).
      api_key: sent as ``authorization: Bearer <key>``; outside local development only over TLS.
      timeout: every call's deadline unless the call gives its own: seconds, a
        :class:`Timeout`, or None (the default: no deadline).
      tls: ``ChannelTLS`` (CA, client certificate for mutual TLS, server name), or True for TLS
        that trusts the system's root certificates; None or False: plaintext.
      cache: a SQLite file (or a :class:`ResponseCache`) that answers deterministic requests
        (temperature 0 or top_k 1) seen before, without calling the server. Off by default.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: TimeoutArg = None,
        tls: ChannelTLS | bool | None = None,
        cache: CacheArg = None,
    ) -> None:
        self._conn = Connection(
            target, gen_grpc.GenerationStub, api_key=api_key, timeout=timeout, tls=tls
        )
        self._owns_cache = cache is not None and not isinstance(cache, ResponseCache)
        self.cache = (
            cache if isinstance(cache, ResponseCache) or cache is None else ResponseCache(cache)
        )

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return self._conn.metadata

    async def close(self) -> None:
        await self._conn.close()
        if self.cache is not None and self._owns_cache:  # a ResponseCache passed in is the caller's
            self.cache.close()

    def _stub(self) -> gen_grpc.GenerationStub:
        return self._conn.stub()

    async def generate(
        self,
        prompt: PromptArg = None,
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        instructions: str | None = None,
        token_ids: Sequence[int] | None = None,
        request_id: str | None = None,
        priority: int | None = None,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> Completion:
        """Generate a whole reply. ``prompt`` is text or a chat (list of {role, content}); the
        request keywords are :class:`RequestFields` (unset: the model's defaults).

        One call, no retries (``generate_batch`` retries); a failure raises a ``MeshError``.
        """
        fields = RequestFields(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            instructions=instructions,
            token_ids=token_ids,
            request_id=request_id,
            priority=priority,
        )
        return await self.generate_with(prompt, model=model, fields=fields, timeout=timeout)

    async def generate_with(
        self,
        prompt: PromptArg,
        *,
        model: str,
        fields: RequestFields,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> Completion:
        """:meth:`generate` with the request fields as one :class:`RequestFields`."""
        transport = _Transport(self, fields)
        prepared = transport.prepare({"prompt": prompt, "model": model})
        if (hit := transport.cached(prepared)) is not None:
            return hit
        completion, _ = await transport.send(prepared, timeout)
        transport.store(prepared, completion)
        return completion

    def stream(
        self,
        prompt: PromptArg = None,
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        instructions: str | None = None,
        token_ids: Sequence[int] | None = None,
        request_id: str | None = None,
        priority: int | None = None,
        coalesce_tokens: int = 0,
        coalesce_ms: int = 0,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> AsyncGenerator[StreamChunk]:
        """Stream a reply chunk by chunk; leaving the loop early cancels generation.
        ``coalesce_tokens`` / ``coalesce_ms``: the server sends once that many tokens are
        pending, or once the oldest has waited that long (0: each token as it comes).

        Never retried and never cached: tokens already shown cannot be taken back.
        """
        fields = RequestFields(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            instructions=instructions,
            token_ids=token_ids,
            request_id=request_id,
            priority=priority,
        )
        return self.stream_with(
            prompt,
            model=model,
            fields=fields,
            coalesce_tokens=coalesce_tokens,
            coalesce_ms=coalesce_ms,
            timeout=timeout,
        )

    async def stream_with(
        self,
        prompt: PromptArg,
        *,
        model: str,
        fields: RequestFields,
        coalesce_tokens: int = 0,
        coalesce_ms: int = 0,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> AsyncGenerator[StreamChunk]:
        """:meth:`stream` with the request fields as one :class:`RequestFields`."""
        req = build_request(
            prompt,
            model=model,
            fields=fields,
            coalesce_tokens=coalesce_tokens,
            coalesce_ms=coalesce_ms,
        )
        span = tracer.start_span(
            "meshllm.client/GenerateStream",
            kind=SpanKind.CLIENT,
            attributes={
                "meshllm.model": model,
                **rpc_attributes("GenerateStream", self._conn.target),
                **generation_attributes(req),
            },
        )
        call = self._stub().GenerateStream(
            req, timeout=self._deadline(timeout), metadata=(*self._metadata, *inject(span))
        )
        try:
            with ending(span):
                async for msg in call:
                    yield chunk_from_pb(msg)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    async def list_models(self, *, timeout: CallTimeout = USE_CLIENT_DEFAULT) -> list[ModelInfo]:
        """The models that can serve requests now, with their limits and ready replicas."""
        try:
            resp = await self._stub().ListModels(
                gen.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        return models_from_pb(resp)

    def iter_batch(
        self,
        prompts: Iterable[Prompt],
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        instructions: str | None = None,
        token_ids: Sequence[int] | None = None,
        request_id: str | None = None,
        priority: int | None = None,
        options: BatchOptions = DEFAULT_BATCH,
    ) -> AsyncGenerator[BatchItem]:
        """Generate for every prompt, yielding a :class:`BatchItem` per prompt as they finish:
        in input order (``options.ordered``, the default) or in completion order. Only a
        bounded window is held, so memory stays flat for any number of prompts (``prompts``
        may be a generator; it is read as the window moves).

        Each prompt is text, a chat (list of {role, content}), or a dict of request fields
        (``prompt``/``messages`` plus per-item fields overriding the request keywords, which
        hold for every item). A failed item carries its error; :class:`BatchOptions` sets the
        concurrency, retries, pacing, abort threshold, callback, progress bar and per-call
        timeout.
        """
        fields = RequestFields(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            instructions=instructions,
            token_ids=token_ids,
            request_id=request_id,
            priority=priority,
        )
        return self.iter_batch_with(prompts, model=model, fields=fields, options=options)

    async def iter_batch_with(
        self,
        prompts: Iterable[Prompt | Refused],
        *,
        model: str,
        fields: RequestFields,
        options: BatchOptions = DEFAULT_BATCH,
    ) -> AsyncGenerator[BatchItem]:
        """:meth:`iter_batch` with the request fields as one :class:`RequestFields`; a
        ``Refused`` input ends with its error, unsent, in its place."""
        build_request(None, model=model, fields=fields)  # a bad batch-wide field fails here, once
        runner = BatchRunner(_Transport(self, fields), options)
        async for item in runner.run(prompts, {"model": model}):
            yield item

    async def generate_batch(
        self,
        prompts: Iterable[Prompt],
        *,
        model: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        instructions: str | None = None,
        token_ids: Sequence[int] | None = None,
        request_id: str | None = None,
        priority: int | None = None,
        options: BatchOptions = DEFAULT_BATCH,
    ) -> list[BatchItem]:
        """:meth:`iter_batch` collected into a list, in input order (the list itself grows
        with the input: for very large inputs iterate ``iter_batch`` instead)."""
        fields = RequestFields(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            instructions=instructions,
            token_ids=token_ids,
            request_id=request_id,
            priority=priority,
        )
        ordered = replace(options, ordered=True)
        items = self.iter_batch_with(prompts, model=model, fields=fields, options=ordered)
        return [item async for item in items]

    def _deadline(self, timeout: CallTimeout) -> float | None:
        return resolve_timeout(timeout, self.timeout)


class _Transport:
    """How a batch (and ``generate``) prepares, caches and sends one request."""

    def __init__(self, client: AsyncClient, fields: RequestFields) -> None:
        self.client, self.fields = client, fields

    def prepare(self, fields: dict[str, Any]) -> Prepared:
        """``fields``: ``model``, ``prompt`` and an item's own request fields."""
        own = dict(fields)
        prompt, model = own.pop("prompt", None), own.pop("model")
        request = self.fields.updated(own)
        req = build_request(prompt, model=model, fields=request)
        key = (
            cache_key(canonical_request(req))
            if self.client.cache is not None and deterministic(req)
            else None
        )
        return Prepared(req, key, float(request.tokens(prompt)))

    def cached(self, prepared: Prepared) -> Completion | None:
        cache = self.client.cache
        return cache.get(prepared.key) if cache is not None and prepared.key else None

    def store(self, prepared: Prepared, completion: Completion) -> None:
        cache = self.client.cache
        if cache is not None and prepared.key:
            cache.put(prepared.key, completion)

    async def send(self, prepared: Prepared, timeout: CallTimeout) -> tuple[Completion, RateLimits]:
        """One unary call; the router's ``x-ratelimit-*`` initial metadata comes back with it."""
        client, req = self.client, prepared.request
        span = tracer.start_span(
            "meshllm.client/Generate",
            kind=SpanKind.CLIENT,
            attributes={
                "meshllm.model": req.model,
                **rpc_attributes("Generate", client._conn.target),
                **generation_attributes(req),
            },
        )
        with ending(span):
            call = client._stub().Generate(
                req, timeout=client._deadline(timeout), metadata=(*client._metadata, *inject(span))
            )
            try:
                metadata = await call.initial_metadata()
                response = await call
            except grpc.aio.AioRpcError as e:
                raise from_rpc_error(e) from None
        completion = completion_from_pb(response)
        if not completion.whole:  # never a success: a server cut it short
            raise cut_short(completion)
        return completion, parse_rate_limits(metadata)
