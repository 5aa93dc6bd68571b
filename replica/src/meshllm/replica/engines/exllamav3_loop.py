"""The thread that drives a continuous-batching generator: ExLlamaV3's synchronous
``Generator.iterate()`` loop, or a test double with the same four methods.

ExLlamaV3's ``AsyncGenerator`` runs that loop on the event loop and blocks it, so the replica
runs it here instead, on a thread of its own. Requests wait in meshllm's priority queue until
the generator has room (``max_jobs``); each one becomes a job (``enqueue``), every ``iterate()``
step returns result dicts whose token ids go onto the request's :class:`TokenStream` (which
wakes the event loop with ``call_soon_threadsafe``), and a request whose client went away, or
whose stream has all it wants, is ``cancel``-ed between two steps, freeing its cache pages.
Only this thread touches the generator.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from meshllm.api.types import FinishReason
from meshllm.replica.engines.base import EngineSettings
from meshllm.replica.engines.exllamav3_jobs import JobSpec, cache_utilization, job_spec, read_result
from meshllm.replica.engines.queue import BatchQueue
from meshllm.replica.engines.stream import TokenStream
from meshllm.replica.types import EngineStats, SamplingParams

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.1
"""Longest sleep of an idle loop between checks (new work wakes it at once)."""


class JobGenerator(Protocol):
    """What the loop uses of ExLlamaV3's ``Generator``."""

    def enqueue(self, job: Any) -> Any:
        """Queue a job; it starts when the cache has room for it."""

    def cancel(self, job: Any) -> None:
        """Drop a pending or running job and free its cache pages."""

    def iterate(self) -> list[dict[str, Any]]:
        """Run one step for all running jobs; return their result dicts."""

    def num_remaining_jobs(self) -> int:
        """Jobs pending or running."""


JobFactory = Callable[[JobSpec], Any]
"""Builds the library's job object from a spec (on the loop thread)."""
CachePages = Callable[[], tuple[int, int]]
"""(pages held by live jobs, pages in the cache), read on the loop thread after each step."""


@dataclass(eq=False)
class Request:
    spec: JobSpec
    stream: TokenStream
    job: Any = None
    """The generator's job, once enqueued."""


class GeneratorLoop:
    """An engine (the replica's Engine protocol) around a generator, driven on one thread.

    Subclasses (or callers) supply the generator, the job factory and, optionally, a way to read
    the cache's page use; ``release`` frees the model after the thread has stopped.
    """

    name = "generator-loop"

    def __init__(
        self,
        settings: EngineSettings,
        generator: JobGenerator,
        make_job: JobFactory,
        *,
        max_jobs: int,
        cache_pages: CachePages | None = None,
    ) -> None:
        self.settings = settings
        self.max_jobs = max_jobs
        self._generator: JobGenerator | None = generator
        self._make_job = make_job
        self._cache_pages = cache_pages
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _waiting and _active (read by stats())
        self._waiting: BatchQueue[Request] = BatchQueue()
        self._active: dict[object, Request] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pages = (0, 0)

    # -- Engine protocol (event loop) -----------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    def submit(
        self, prompt_ids: tuple[int, ...], sampling: SamplingParams, priority: int
    ) -> TokenStream:
        if self._loop is None or self._stopping:
            raise RuntimeError(f"{self.name} engine is not running")
        stream = TokenStream(
            self._loop, max_tokens=sampling.max_tokens, eos_ids=self.settings.eos_ids
        )
        spec = job_spec(next(self._ids), prompt_ids, sampling, self.settings.eos_ids)
        with self._lock:
            self._waiting.put(Request(spec, stream), key=0, priority=priority)
        self._wake.set()
        return stream

    def stats(self) -> EngineStats:
        with self._lock:
            requests = [*self._waiting.items(), *self._active.values()]
        running = sum(1 for r in requests if r.stream.started is not None)
        left = sum(r.stream.max_tokens - r.stream.generated for r in requests)
        used, total = self._pages
        return EngineStats(
            queued=len(requests) - running,
            running=running,
            tokens_in_flight=left,
            cache_utilization=cache_utilization(used, total),
            extra={"cache_pages_used": float(used), "cache_pages_total": float(total)},
            capacity=self.max_jobs,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._finish_all(FinishReason.CANCELLED)  # also what a racing submit() put in
        self._generator = None  # the thread is gone: drop this reference to the model too
        self.release()

    @property
    def generator(self) -> JobGenerator:
        if self._generator is None:
            raise RuntimeError(f"{self.name} engine is closed")
        return self._generator

    def release(self) -> None:
        """Free the model (called once the loop thread has stopped)."""

    def prepare_thread(self) -> None:
        """Run first on the loop thread (e.g. select the CUDA device for it)."""

    # -- the loop (its own thread) --------------------------------------------------------------

    def _run(self) -> None:
        reason, error = FinishReason.CANCELLED, None
        try:
            self.prepare_thread()
            while not self._stopping:
                self._admit()
                self._drop_cancelled()
                self._read_pages()
                if not self._active:
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                self._step()
        except Exception as e:  # a bug here must not leave streams waiting forever
            log.exception("%s loop stopped", self.name)
            reason, error = FinishReason.ERROR, e
        finally:
            self._stopping = True  # submit() refuses new work from now on
            self._finish_all(reason, error)

    def _step(self) -> None:
        """One ``iterate()`` and its results; a failing step fails the requests it ran."""
        try:
            for result in self.generator.iterate():
                self._dispatch(result)
        except Exception as e:
            log.exception("%s step failed with %d jobs", self.name, len(self._active))
            self._finish_all(FinishReason.ERROR, e)

    def _read_pages(self) -> None:
        """Snapshot the cache's page use for stats() (after steps and cancellations)."""
        if self._cache_pages is None:
            return
        try:
            self._pages = self._cache_pages()
        except Exception:  # a library internal that moved must not stop serving
            log.warning("%s cannot read cache use; reporting none", self.name, exc_info=True)
            self._cache_pages, self._pages = None, (0, 0)

    def _admit(self) -> None:
        """Hand waiting requests to the generator while it has fewer than ``max_jobs``."""
        with self._lock:
            gone = self._waiting.remove_if(lambda r: r.stream.cancelled)
            room = self.max_jobs - len(self._active)
            batch = self._waiting.take_batch(room) if room > 0 else []
        for request in gone:
            request.stream.finish(FinishReason.CANCELLED)
        for request in batch:
            try:
                request.job = self._make_job(request.spec)
                self.generator.enqueue(request.job)
            except Exception as e:  # e.g. a job the cache can never hold: fail it alone
                log.exception("%s could not enqueue request %d", self.name, request.spec.identifier)
                request.stream.finish(FinishReason.ERROR, e)
                continue
            with self._lock:
                self._active[request.spec.identifier] = request

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._active.values() if r.stream.cancelled]:
            self._end(request, FinishReason.CANCELLED, cancel_job=True)

    def _dispatch(self, result: dict[str, Any]) -> None:
        event = read_result(result)
        request = self._active.get(event.identifier)
        if request is None:  # a job already ended or cancelled here
            return
        stream = request.stream
        if stream.started is None:
            stream.mark_started()
        wants_no_more = False
        for token in event.token_ids:
            if stream.push(token):  # cancelled, end-of-sequence or its max_tokens reached
                wants_no_more = True
                break
        if event.finish_reason is not None:
            log.debug(
                "job %s ended (%s): %d prompt + %d new tokens",
                event.identifier,
                event.eos_reason,
                event.prompt_tokens,
                event.completion_tokens,
            )
            self._end(request, event.finish_reason, cancel_job=False)
        elif wants_no_more:
            reason = FinishReason.CANCELLED if stream.cancelled else FinishReason.STOP
            self._end(request, reason, cancel_job=True)

    def _end(self, request: Request, reason: FinishReason, *, cancel_job: bool) -> None:
        with self._lock:
            self._active.pop(request.spec.identifier, None)
        if cancel_job:
            self.generator.cancel(request.job)
        request.stream.finish(reason)  # the first reason wins: EOS or length set by push stays

    def _finish_all(self, reason: FinishReason, error: BaseException | None = None) -> None:
        """End every running request (and, when stopping, every waiting one): on shutdown or
        after a failed step, whose requests fail with its error."""
        with self._lock:
            active = list(self._active.values())
            self._active.clear()
            waiting = self._waiting.remove_if(lambda _: True) if self._stopping else []
        for request in active:
            try:
                self.generator.cancel(request.job)
            except Exception:  # the generator may be broken after a failed step
                log.exception("%s could not cancel job %d", self.name, request.spec.identifier)
        for request in (*active, *waiting):
            request.stream.finish(reason, error)
