"""Client: the blocking twin of AsyncClient, safe inside Jupyter (a running event loop).

Every call runs on one private event loop in a background thread, so the caller's own loop
(if any) is never re-entered and ``asyncio.run`` is never called inside a running loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from meshllm.api.errors import MeshError
from meshllm.api.tls import ChannelTLS
from meshllm.client._async import AsyncClient, PromptArg
from meshllm.client._types import BatchItem, Completion, ModelInfo, Prompt, StreamChunk

T = TypeVar("T")
_END = object()


class Client:
    """Blocking client with the same methods as :class:`AsyncClient`."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        tls: ChannelTLS | bool | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="meshllm-client", daemon=True
        )
        self._thread.start()
        self._async = AsyncClient(target, api_key=api_key, timeout=timeout, tls=tls)

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
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def generate(
        self, prompt: PromptArg = None, *, model: str, timeout: float | None = None, **fields: Any
    ) -> Completion:
        return self._run(self._async.generate(prompt, model=model, timeout=timeout, **fields))

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return self._run(self._async.list_models(timeout=timeout))

    def generate_batch(
        self,
        prompts: Iterable[Prompt],
        *,
        model: str,
        concurrency: int = 32,
        on_result: Callable[[int, Completion | None, MeshError | None], None] | None = None,
        **fields: Any,
    ) -> list[BatchItem]:
        return self._run(self._async.generate_batch(
            prompts, model=model, concurrency=concurrency, on_result=on_result, **fields
        ))  # fmt: skip

    def stream(
        self, prompt: PromptArg = None, *, model: str, timeout: float | None = None, **fields: Any
    ) -> Iterator[StreamChunk]:
        """Iterate over chunks; stopping early (break, close) cancels generation."""
        chunks: queue.SimpleQueue[object] = queue.SimpleQueue()

        async def pump() -> None:
            try:
                async for chunk in self._async.stream(
                    prompt, model=model, timeout=timeout, **fields
                ):
                    chunks.put(chunk)
                chunks.put(_END)
            except BaseException as e:  # handed to the caller's thread, re-raised there
                chunks.put(e)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := chunks.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, StreamChunk)  # queue holds chunks, errors and _END only
                yield item
        finally:
            future.cancel()
