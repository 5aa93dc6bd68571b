"""TokenStream: tokens of one request, pushed by an engine thread and read on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

from meshllm.api.types import FinishReason

_NEVER = 1 << 30


class TokenStream:
    """A one-producer, one-consumer handoff that coalesces tokens when the reader is behind.

    The producer (an engine worker thread, holding the GIL inside a CTranslate2 callback) only
    appends under a lock and wakes the reader when it is waiting for that many tokens, so a slow
    reader costs no wake-ups and receives everything pending in one read.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, max_tokens: int, eos_ids: frozenset[int]
    ):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[int] = []
        self._want = _NEVER  # the reader wakes when len(pending) reaches this
        self._waiter: asyncio.Future[None] | None = None
        self._eos = eos_ids
        self.max_tokens = max_tokens
        self.generated = 0
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.created = time.perf_counter()
        self.started: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.first_pending: float | None = None
        self.observer: Callable[[TokenStream], None] | None = None
        """Called (on the producer's thread) after each change: start, token, finish. The engine
        process uses it to relay a step's tokens of every running sequence in one message."""

    # -- producer side (any thread) -------------------------------------------------------------

    def mark_started(self) -> None:
        self.started = time.perf_counter()
        if self.observer is not None:
            self.observer(self)

    def push(self, token_id: int) -> bool:
        """Add one generated token; return True when the engine should stop this request."""
        if self.cancelled or self.finish_reason is not None:
            return True
        if token_id in self._eos:
            self.finish(FinishReason.STOP)
            return True
        now = time.perf_counter()
        with self._lock:
            self._pending.append(token_id)
            if self.first_token is None:
                self.first_token = now
            if self.first_pending is None:
                self.first_pending = now
            self.last_token = now
            self.generated += 1
            done = self.generated >= self.max_tokens
            if done:
                self.finish_reason = FinishReason.LENGTH
            wake = self._waiter is not None and (done or len(self._pending) >= self._want)
            if wake:
                self._want = _NEVER
        if wake:
            self._notify()
        if self.observer is not None:
            self.observer(self)
        return done

    def finish(self, reason: FinishReason, error: BaseException | None = None) -> None:
        """End the stream (idempotent: the first reason wins)."""
        with self._lock:
            if self.finish_reason is None:
                self.finish_reason = reason
                self.error = error
            wake = self._waiter is not None
            self._want = _NEVER
        if wake:
            self._notify()
        if self.observer is not None:
            self.observer(self)

    # -- consumer side (event loop) -------------------------------------------------------------

    @property
    def produced(self) -> int:
        """Tokens the engine generated for this request (cancelled ones past ``generated`` too,
        where the engine runs elsewhere)."""
        return self.generated

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(self) -> list[int]:
        """Every pending token, now (any thread); the relay's non-waiting read."""
        with self._lock:
            taken, self._pending = self._pending, []
            self.first_pending = None
        return taken

    def cancel(self) -> None:
        """Ask the engine to stop; it notices at the next token (or before the batch starts)."""
        self.cancelled = True

    async def read(self, min_tokens: int = 1, max_wait_s: float = 0.0) -> list[int]:
        """Wait for tokens and take all pending ones; [] means the stream has finished.

        Waits until ``min_tokens`` are pending, or ``max_wait_s`` after the oldest pending
        token arrived (when > 0), or the stream ends.
        """
        if not await self._wait_for(1):
            return []
        if min_tokens > 1:
            timeout = None
            if max_wait_s > 0 and self.first_pending is not None:
                timeout = max(0.0, self.first_pending + max_wait_s - time.perf_counter())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: it can lose a cancel on 3.11
                    await self._wait_for(min_tokens)
        with self._lock:
            taken, self._pending = self._pending, []
            self.first_pending = None
        return taken

    async def _wait_for(self, count: int) -> bool:
        """Wait until ``count`` tokens are pending or the stream ends; False if none pending."""
        while True:
            with self._lock:
                if len(self._pending) >= count or self.finish_reason is not None:
                    return bool(self._pending)
                waiter = self._loop.create_future()
                self._waiter, self._want = waiter, count
            try:
                await waiter
            finally:
                self._waiter = None

    def _notify(self) -> None:
        """Wake the reader from the producer's thread."""
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
