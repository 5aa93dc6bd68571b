"""Client: the blocking twin of AsyncClient, safe inside Jupyter (a running event loop).

Every call runs on one private event loop in a background thread, so the caller's own loop
(if any) is never re-entered and ``asyncio.run`` is never called inside a running loop. Each
method hands its arguments to the AsyncClient method of the same name: all logic lives there,
and a test pins the two signatures to each other. Callbacks (``on_result``) run on that
background thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from meshllm.api.tls import ChannelTLS
from meshllm.client._abort import AbortPolicy
from meshllm.client._async import AsyncClient, CacheArg, PromptArg
from meshllm.client._batch import OnResult
from meshllm.client._pacing import Pacing
from meshllm.client._retry import RetryPolicy
from meshllm.client._types import BatchItem, Completion, ModelInfo, Prompt, StreamChunk

T = TypeVar("T")


class Client:
    """Blocking client with the same methods as :class:`AsyncClient`."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        tls: ChannelTLS | bool | None = None,
        cache: CacheArg = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="meshllm-client", daemon=True
        )
        self._thread.start()
        self._async = AsyncClient(target, api_key=api_key, timeout=timeout, tls=tls, cache=cache)

    @property
    def target(self) -> str:
        return self._async.target

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt included: stop the work on the loop too
            future.cancel()
            raise

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """Pull one item at a time from an async iterator on the loop: the producer never runs
        ahead of the caller (a batch keeps only its window); leaving early closes it."""

        async def step() -> tuple[bool, T | None]:
            try:
                return True, await anext(agen)
            except StopAsyncIteration:
                return False, None

        async def close() -> None:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while True:
                more, item = self._run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]  # T when more is True
        finally:
            if not self._loop.is_closed():
                self._run(close())

    def generate(
        self, prompt: PromptArg = None, *, model: str, timeout: float | None = None, **fields: Any
    ) -> Completion:
        return self._run(self._async.generate(prompt, model=model, timeout=timeout, **fields))

    def stream(
        self, prompt: PromptArg = None, *, model: str, timeout: float | None = None, **fields: Any
    ) -> Iterator[StreamChunk]:
        """Iterate over chunks; stopping early (break, close) cancels generation."""
        return self._iterate(self._async.stream(prompt, model=model, timeout=timeout, **fields))

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return self._run(self._async.list_models(timeout=timeout))

    def iter_batch(
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
    ) -> Iterator[BatchItem]:
        """See :meth:`AsyncClient.iter_batch`. ``prompts`` is read on the client's thread."""
        return self._iterate(self._async.iter_batch(
            prompts, model=model, concurrency=concurrency, ordered=ordered, retry=retry,
            pacing=pacing, abort=abort, on_result=on_result, progress=progress, timeout=timeout,
            **fields,
        ))  # fmt: skip

    def generate_batch(
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
        """See :meth:`AsyncClient.generate_batch`."""
        return self._run(self._async.generate_batch(
            prompts, model=model, concurrency=concurrency, retry=retry, pacing=pacing,
            abort=abort, on_result=on_result, progress=progress, timeout=timeout, **fields,
        ))  # fmt: skip
