"""Client: the blocking twin of AsyncClient, safe inside Jupyter (a running event loop).

Every call runs on one private event loop in a background thread (``_loop``), so the caller's
own loop (if any) is never re-entered. Each method hands its arguments to the AsyncClient
method of the same name: all logic lives there, and a test pins the two signatures to each
other. Callbacks (``on_result``) run on that
background thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from meshllm.api.tls import ChannelTLS
from meshllm.api.types import ModelInfo
from meshllm.client._async import DEFAULT_BATCH, AsyncClient, CacheArg, PromptArg
from meshllm.client._batch import BatchOptions, Refused
from meshllm.client._connection import SyncTwin
from meshllm.client._options import (
    USE_CLIENT_DEFAULT,
    CallTimeout,
    RequestFields,
    TimeoutArg,
)
from meshllm.client._types import BatchItem, Completion, Prompt, StreamChunk


class Client(SyncTwin[AsyncClient]):
    """Blocking client with the same methods as :class:`AsyncClient`."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: TimeoutArg = None,
        tls: ChannelTLS | bool | None = None,
        cache: CacheArg = None,
    ) -> None:
        core = AsyncClient(target, api_key=api_key, timeout=timeout, tls=tls, cache=cache)
        super().__init__("meshllm-client", core)

    def generate(
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
        """See :meth:`AsyncClient.generate`."""
        return self._run(
            self._async.generate(
                prompt,
                model=model,
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
                timeout=timeout,
            )
        )

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
    ) -> Iterator[StreamChunk]:
        """See :meth:`AsyncClient.stream`; stopping early (break, close) cancels generation."""
        return self._loop.iterate(
            self._async.stream(
                prompt,
                model=model,
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
                coalesce_tokens=coalesce_tokens,
                coalesce_ms=coalesce_ms,
                timeout=timeout,
            )
        )

    def generate_with(
        self,
        prompt: PromptArg,
        *,
        model: str,
        fields: RequestFields,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> Completion:
        """See :meth:`AsyncClient.generate_with`."""
        return self._run(
            self._async.generate_with(prompt, model=model, fields=fields, timeout=timeout)
        )

    def stream_with(
        self,
        prompt: PromptArg,
        *,
        model: str,
        fields: RequestFields,
        coalesce_tokens: int = 0,
        coalesce_ms: int = 0,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> Iterator[StreamChunk]:
        """See :meth:`AsyncClient.stream_with`."""
        return self._loop.iterate(
            self._async.stream_with(
                prompt,
                model=model,
                fields=fields,
                coalesce_tokens=coalesce_tokens,
                coalesce_ms=coalesce_ms,
                timeout=timeout,
            )
        )

    def iter_batch_with(
        self,
        prompts: Iterable[Prompt | Refused],
        *,
        model: str,
        fields: RequestFields,
        options: BatchOptions = DEFAULT_BATCH,
    ) -> Iterator[BatchItem]:
        """See :meth:`AsyncClient.iter_batch_with`."""
        return self._loop.iterate(
            self._async.iter_batch_with(prompts, model=model, fields=fields, options=options)
        )

    def list_models(self, *, timeout: CallTimeout = USE_CLIENT_DEFAULT) -> list[ModelInfo]:
        """See :meth:`AsyncClient.list_models`."""
        return self._run(self._async.list_models(timeout=timeout))

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
    ) -> Iterator[BatchItem]:
        """See :meth:`AsyncClient.iter_batch`. ``prompts`` is read on the client's thread."""
        return self._loop.iterate(
            self._async.iter_batch(
                prompts,
                model=model,
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
                options=options,
            )
        )

    def generate_batch(
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
        """See :meth:`AsyncClient.generate_batch`."""
        return self._run(
            self._async.generate_batch(
                prompts,
                model=model,
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
                options=options,
            )
        )
