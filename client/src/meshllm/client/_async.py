"""AsyncClient: the asyncio client. ``Client`` (in ``_sync``) is its blocking twin."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry.trace import SpanKind

from meshllm.api.errors import from_rpc_error
from meshllm.api.tls import ChannelTLS, channel
from meshllm.api.tracing import ending, inject, tracer
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client._abort import NEVER, AbortPolicy
from meshllm.client._batch import BatchOptions, BatchRunner, OnResult, Prepared, token_estimate
from meshllm.client._cache import ResponseCache, cache_key
from meshllm.client._convert import (
    build_request,
    canonical_request,
    chunk_from_pb,
    completion_from_pb,
    deterministic,
    model_from_pb,
)
from meshllm.client._pacing import Pacing, RateLimits, parse_rate_limits
from meshllm.client._retry import RetryPolicy
from meshllm.client._types import BatchItem, Completion, ModelInfo, Prompt, StreamChunk

PromptArg = str | Sequence[Mapping[str, str]] | None
CacheArg = str | os.PathLike[str] | ResponseCache | None


class AsyncClient:
    """Client for a meshllm router or replica (both serve ``meshllm.api.v1.Generation``).

    Args:
      target: ``host:port`` of the router (or of one replica, for development).
      api_key: sent as ``authorization: Bearer <key>``; outside local development only over TLS.
      timeout: default deadline per call, in seconds (None: no deadline).
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
        timeout: float | None = None,
        tls: ChannelTLS | bool | None = None,
        cache: CacheArg = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.tls = ChannelTLS() if tls is True else tls or None
        self._owns_cache = cache is not None and not isinstance(cache, ResponseCache)
        self.cache = (
            cache if isinstance(cache, ResponseCache) or cache is None else ResponseCache(cache)
        )
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
        if self.cache is not None and self._owns_cache:  # a ResponseCache passed in is the caller's
            self.cache.close()

    def _stub(self) -> gen_grpc.GenerationStub:
        if self._stub_obj is None:
            self._channel = channel(self.target, self.tls)
            self._stub_obj = gen_grpc.GenerationStub(self._channel)
        return self._stub_obj

    async def generate(
        self, prompt: PromptArg = None, *, model: str, timeout: float | None = None, **fields: Any
    ) -> Completion:
        """Generate a whole reply. ``fields``: max_tokens, temperature, stop, token_ids, ... .

        One call, no retries (``generate_batch`` retries); a failure raises a ``MeshError``.
        """
        transport = _Transport(self)
        prepared = transport.prepare({**fields, "prompt": prompt, "model": model})
        if (hit := transport.cached(prepared)) is not None:
            return hit
        completion, _ = await transport.send(prepared, timeout)
        transport.store(prepared, completion)
        return completion

    async def stream(
        self, prompt: PromptArg = None, *, model: str, timeout: float | None = None, **fields: Any
    ) -> AsyncGenerator[StreamChunk]:
        """Stream a reply chunk by chunk; leaving the loop early cancels generation.

        Never retried and never cached: tokens already shown cannot be taken back.
        """
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

    async def iter_batch(
        self,
        prompts: Iterable[Prompt],
        *,
        model: str,
        concurrency: int = 32,
        ordered: bool = True,
        retry: RetryPolicy | None = None,
        pacing: Pacing | None = None,
        abort: AbortPolicy | None = None,
        on_result: OnResult | None = None,
        progress: bool = False,
        timeout: float | None = None,
        **fields: Any,
    ) -> AsyncGenerator[BatchItem]:
        """Generate for every prompt, yielding a :class:`BatchItem` per prompt as they finish:
        in input order (``ordered``, the default) or in completion order. Only a bounded
        window is held, so memory stays flat for any number of prompts (``prompts`` may be a
        generator; it is read as the window moves).

        Each prompt is text, a chat (list of {role, content}), or a dict of request fields
        (``prompt``/``messages`` plus per-item fields overriding ``fields``). A failed item
        carries its error; transient failures are retried first (``retry``: exponential
        backoff with jitter, never sooner than the server's RetryInfo). ``pacing`` keeps under
        explicit rates and the router's quota; ``abort`` stops a run that keeps failing (the
        rest end with ``Aborted``); ``on_result(index, result, error)`` is called for every
        item as it finishes; ``progress`` shows a tqdm bar on stderr.
        """
        build_request(None, model=model, **fields)  # a bad batch-wide field fails here, once
        options = BatchOptions(concurrency=concurrency, ordered=ordered,
                               retry=retry or RetryPolicy(), pacing=pacing or Pacing(),
                               abort=abort or NEVER, progress=progress, timeout=timeout)  # fmt: skip
        runner = BatchRunner(_Transport(self), options)
        async for item in runner.run(prompts, {**fields, "model": model}, on_result):
            yield item

    async def generate_batch(
        self,
        prompts: Iterable[Prompt],
        *,
        model: str,
        concurrency: int = 32,
        retry: RetryPolicy | None = None,
        pacing: Pacing | None = None,
        abort: AbortPolicy | None = None,
        on_result: OnResult | None = None,
        progress: bool = False,
        timeout: float | None = None,
        **fields: Any,
    ) -> list[BatchItem]:
        """:meth:`iter_batch` collected into a list, in input order (the list itself grows
        with the input: for very large inputs iterate ``iter_batch`` instead)."""
        items = self.iter_batch(prompts, model=model, concurrency=concurrency, retry=retry,
                                pacing=pacing, abort=abort, on_result=on_result,
                                progress=progress, timeout=timeout, **fields)  # fmt: skip
        return [item async for item in items]

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout


class _Transport:
    """How a batch (and ``generate``) prepares, caches and sends one request."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    def prepare(self, fields: dict[str, Any]) -> Prepared:
        fields = dict(fields)
        prompt, model = fields.pop("prompt", None), fields.pop("model")
        req = build_request(prompt, model=model, **fields)
        key = (
            cache_key(canonical_request(req))
            if self.client.cache is not None and deterministic(req)
            else None
        )
        return Prepared(req, key, token_estimate({**fields, "prompt": prompt}))

    def cached(self, prepared: Prepared) -> Completion | None:
        cache = self.client.cache
        return cache.get(prepared.key) if cache is not None and prepared.key else None

    def store(self, prepared: Prepared, completion: Completion) -> None:
        cache = self.client.cache
        if cache is not None and prepared.key:
            cache.put(prepared.key, completion)

    async def send(
        self, prepared: Prepared, timeout: float | None
    ) -> tuple[Completion, RateLimits]:
        """One unary call; the router's ``x-ratelimit-*`` initial metadata comes back with it."""
        client, req = self.client, prepared.request
        span = tracer.start_span("meshllm.client/Generate", kind=SpanKind.CLIENT,
                                 attributes={"meshllm.model": req.model})  # fmt: skip
        with ending(span):
            call = client._stub().Generate(
                req, timeout=client._timeout(timeout), metadata=(*client._metadata, *inject(span))
            )
            try:
                metadata = await call.initial_metadata()
                response = await call
            except grpc.aio.AioRpcError as e:
                raise from_rpc_error(e) from None
        return completion_from_pb(response), parse_rate_limits(metadata)
