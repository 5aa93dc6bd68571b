"""A micro-batching worker pool shared by engines without continuous batching.

Requests queue on the event loop; each of ``inter_threads`` workers takes the most urgent
request plus every queued request with the same sampling settings (after a short window for
stragglers to join) and runs them as one batch on its own thread. A free worker never waits
behind a busy one, and requests that arrive during a long batch are batched together.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from meshllm.api.types import FinishReason
from meshllm.replica.engines.base import EngineSettings
from meshllm.replica.engines.queue import BatchQueue
from meshllm.replica.engines.stream import TokenStream
from meshllm.replica.types import EngineStats, SamplingParams

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Work:
    """One queued or running request."""

    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stream: TokenStream


class BatchingEngine:
    """Base class: subclasses implement ``run_batch`` (called on a worker thread)."""

    name = "batching"

    def __init__(self, settings: EngineSettings, *, workers: int, max_batch_size: int) -> None:
        self.settings = settings
        self.workers = workers
        self.max_batch_size = max_batch_size
        self._queue: BatchQueue[Work] = BatchQueue()
        self._running: set[Work] = set()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"{self.name}-worker")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work_ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def run_batch(self, batch: list[Work]) -> None:
        """Generate for every item of ``batch``, pushing tokens onto each item's stream."""
        raise NotImplementedError

    def release(self) -> None:
        """Free the model (after the workers have stopped)."""

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._work_ready = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"{self.name}-batcher-{i}")
            for i in range(self.workers)
        ]

    def submit(
        self, prompt_ids: tuple[int, ...], sampling: SamplingParams, priority: int
    ) -> TokenStream:
        if self._loop is None or self._work_ready is None:
            raise RuntimeError("engine not started")
        stream = TokenStream(
            self._loop, max_tokens=sampling.max_tokens, eos_ids=self.settings.eos_ids
        )
        self._queue.put(Work(prompt_ids, sampling, stream), sampling.batch_key(), priority)
        self._work_ready.set()
        return stream

    def stats(self) -> EngineStats:
        queued = self._queue.items()
        left = sum(w.stream.max_tokens - w.stream.generated for w in (*queued, *self._running))
        return EngineStats(
            queued=len(queued),
            running=len(self._running),
            tokens_in_flight=left,
            capacity=self.max_batch_size * self.workers,
        )

    async def close(self) -> None:
        for work in (*self._queue.items(), *self._running):
            work.stream.cancel()
        for work in self._queue.remove_if(lambda _: True):
            work.stream.finish(FinishReason.CANCELLED)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        self.release()

    async def _worker(self) -> None:
        assert self._work_ready is not None  # set in start(); narrows the type
        loop = asyncio.get_running_loop()
        window = self.settings.batch_window_ms / 1000.0
        while True:
            await self._work_ready.wait()
            if window > 0 and len(self._queue) < self.max_batch_size:
                await asyncio.sleep(window)  # let requests arriving together share the batch
            for gone in self._queue.remove_if(lambda w: w.stream.cancelled):
                gone.stream.finish(FinishReason.CANCELLED)
            batch = self._queue.take_batch(self.max_batch_size)
            if not self._queue:
                self._work_ready.clear()
            if not batch:
                continue
            self._running.update(batch)
            try:
                await loop.run_in_executor(self._pool, self._run_guarded, batch)
            finally:
                self._running.difference_update(batch)

    def _run_guarded(self, batch: list[Work]) -> None:
        for work in batch:
            work.stream.mark_started()
        try:
            self.run_batch(batch)
        except Exception as e:
            log.exception("%s batch of %d failed", self.name, len(batch))
            for work in batch:
                work.stream.finish(FinishReason.ERROR, e)
        for work in batch:
            stream = work.stream
            if stream.cancelled:
                stream.finish(FinishReason.CANCELLED)
            elif stream.generated >= stream.max_tokens:
                stream.finish(FinishReason.LENGTH)
            else:
                stream.finish(FinishReason.STOP)
