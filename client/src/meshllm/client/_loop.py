"""A private event loop on a background thread: how the blocking clients run async code.

The caller's own loop (Jupyter's, say) is never re-entered and ``asyncio.run`` is never called
inside a running loop: every coroutine runs on this one, and the caller waits for its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    """``run(coro)`` and ``iterate(async_iterator)`` from any thread; ``close()`` once."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt included: stop the work on the loop too
            future.cancel()
            raise

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
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
                more, item = self.run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]  # T when more is True
        finally:
            if not self.closed:
                self.run(close())

    def close(self, last: Coroutine[Any, Any, None]) -> None:
        """Run ``last`` (the async client's close), then stop the loop and its thread."""
        if self.closed:
            last.close()
            return
        self.run(last)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
