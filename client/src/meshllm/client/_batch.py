"""Running a batch: a bounded window of items in flight, retries, pacing, abort, progress.

Memory is bounded by the window, not by the input: at most ``concurrency`` calls run, and at
most ``4 x concurrency`` items are held between being read from the input and being handed to
the caller (finished items wait there only when ``ordered`` and an earlier one is still
running). The input is read lazily, so a generator of a million prompts is never a list.

The runner does no gRPC itself: a :class:`Transport` (the client) prepares, sends and caches
one request, so retries, pacing and abort are tested exactly with a fake transport and clock.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sized,
)
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshllm.api.errors import Aborted, InvalidArgument, MeshError
from meshllm.client._abort import NEVER, AbortPolicy, FailureTracker
from meshllm.client._options import NAMES, USE_CLIENT_DEFAULT, CallTimeout, RequestFields
from meshllm.client._pacing import Pacer, Pacing, RateLimits, Ticket
from meshllm.client._progress import Progress
from meshllm.client._retry import RetryPolicy, pauses_everyone, retry_delay
from meshllm.client._types import BatchItem, Completion, Prompt, cut_short

OnResult = Callable[[int, Completion | None, MeshError | None], None]
"""Called once per item as it finishes (completion order): ``(index, result, error)``."""

WINDOW_PER_SLOT = 4


@dataclass(frozen=True)
class Prepared:
    """One item's request, ready to send: ``request`` is opaque here (the client's protobuf),
    ``key`` its response-cache key (None: not cacheable), ``tokens`` the quota it reserves."""

    request: Any
    key: str | None
    tokens: float


class Transport(Protocol):
    def prepare(self, fields: dict[str, Any]) -> Prepared:
        """Build the request; raise InvalidArgument (or TypeError/ValueError) if it is bad."""
        ...

    def cached(self, prepared: Prepared) -> Completion | None: ...

    def store(self, prepared: Prepared, completion: Completion) -> None: ...

    def send(
        self, prepared: Prepared, timeout: CallTimeout
    ) -> Awaitable[tuple[Completion, RateLimits]]: ...


@dataclass(frozen=True, kw_only=True)
class BatchOptions:
    """How a batch runs (``iter_batch`` / ``generate_batch``'s ``options``); what each item
    asks the model is set by the methods' request keywords and the item itself."""

    concurrency: int = 32
    """Calls in flight at most."""
    ordered: bool = True
    """Yield in input order (else in completion order; each item carries its ``index``).
    ``generate_batch`` always returns input order."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Which transient failures are retried, and the exponential backoff with jitter between
    tries (never sooner than the server's RetryInfo)."""
    pacing: Pacing = field(default_factory=Pacing)
    """Explicit request and token rates, and following the router's quota headers."""
    abort: AbortPolicy = NEVER
    """When a run that keeps failing stops (the rest end with ``Aborted``); default never."""
    on_result: OnResult | None = None
    """Called as ``on_result(index, result, error)`` for every item as it finishes (completion
    order); an exception it raises stops the batch. On ``Client`` it runs on the client's
    background thread."""
    progress: bool = False
    """Show a progress bar (tqdm, on stderr) with rate and ETA."""
    timeout: CallTimeout = USE_CLIENT_DEFAULT
    """Deadline of each call (not of the batch): seconds, a ``Timeout``, or None for none."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency: need at least 1, got {self.concurrency}")


@dataclass(frozen=True)
class Refused:
    """A batch input its caller already found bad (a JSONL line that is not JSON): it ends
    with ``error``, unsent, in its place in the input order."""

    error: InvalidArgument


def item_fields(item: Prompt | Refused, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields of one batch input: text, a chat, or a dict of request fields
    (``prompt`` or ``messages`` plus any per-item fields; they override the batch's)."""
    if isinstance(item, Refused):
        raise item.error
    if isinstance(item, dict):
        own = dict(item)
        if "messages" in own:
            own["prompt"] = own.pop("messages")
        return {**fields, **own}
    if isinstance(item, (str, list)):
        return {**fields, "prompt": item}
    raise InvalidArgument(f"a batch item is text, a chat or a dict, not {type(item).__name__}")


def token_estimate(fields: Mapping[str, Any]) -> float:
    """Tokens the router reserves for a request given as a dict of fields (``prompt`` and
    request fields; others are ignored): see :meth:`RequestFields.tokens`."""
    request = RequestFields().updated({k: v for k, v in fields.items() if k in NAMES})
    return float(request.tokens(fields.get("prompt")))


class BatchRunner:
    """One batch run. ``run`` is an async generator of :class:`BatchItem`."""

    def __init__(
        self,
        transport: Transport,
        options: BatchOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.transport, self.options = transport, options
        self.clock, self.sleep, self.rng = clock, sleep, rng or random.Random()
        self.pacer = Pacer(options.pacing, clock())
        self.tracker = FailureTracker(options.abort)
        self.aborted: Aborted | None = None

    async def run(
        self, items: Iterable[Prompt | Refused], fields: Mapping[str, Any]
    ) -> AsyncIterator[BatchItem]:
        """``fields``: what every item's request starts from (a dict item's own fields win)."""
        total = len(items) if isinstance(items, Sized) else None
        with Progress(total, enabled=self.options.progress) as progress:
            finish = _Finisher(self, self.options.on_result, progress)
            async for item in self._run(enumerate(items), fields, finish):
                yield item

    async def _run(
        self,
        source: Iterator[tuple[int, Prompt | Refused]],
        fields: Mapping[str, Any],
        finish: _Finisher,
    ) -> AsyncIterator[BatchItem]:
        opts = self.options
        window = WINDOW_PER_SLOT * opts.concurrency
        running: dict[asyncio.Task[BatchItem], int] = {}
        held: dict[int, BatchItem] = {}  # finished, waiting for an earlier index (ordered)
        started = yielded = 0
        try:
            while True:
                while (
                    self.aborted is None
                    and len(running) < opts.concurrency
                    and started - yielded < window
                ):
                    if (nxt := next(source, None)) is None:
                        break
                    index, prompt = nxt
                    running[asyncio.create_task(self._item(index, prompt, fields))] = index
                    started += 1
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                finished = []
                for task in done:
                    del running[task]
                    finished.append(finish(task.result()))
                if self.aborted is not None:
                    finished += await self._abort_running(running, finish)
                for done_item in finished:
                    held[done_item.index] = done_item
                for out in _release(held, yielded, opts.ordered):
                    yielded += 1
                    yield out
            for index, _ in source:  # aborted: what was never started ends the same way
                yield finish(self._aborted_item(index))
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _abort_running(
        self, running: dict[asyncio.Task[BatchItem], int], finish: _Finisher
    ) -> list[BatchItem]:
        for task in running:
            task.cancel()
        outcomes = await asyncio.gather(*running, return_exceptions=True)
        items = []
        for index, outcome in zip(running.values(), outcomes, strict=True):
            if isinstance(outcome, BatchItem):  # it finished before the cancel arrived
                items.append(finish(outcome))
            elif isinstance(outcome, asyncio.CancelledError):
                items.append(finish(self._aborted_item(index)))
            else:
                raise outcome
        running.clear()
        return items

    def _aborted_item(self, index: int) -> BatchItem:
        assert self.aborted is not None  # only called once the batch is aborted
        return BatchItem(index=index, result=None, error=self.aborted, attempts=0)

    async def _item(
        self, index: int, item: Prompt | Refused, fields: Mapping[str, Any]
    ) -> BatchItem:
        try:
            prepared = self.transport.prepare(item_fields(item, fields))
        except (InvalidArgument, TypeError, ValueError) as e:
            error = e if isinstance(e, InvalidArgument) else InvalidArgument(str(e))
            return BatchItem(index=index, result=None, error=error, attempts=0)
        if (hit := self.transport.cached(prepared)) is not None:
            return BatchItem(index=index, result=hit, error=None, attempts=0)
        attempt = 0
        while True:
            attempt += 1
            ticket = await self._paced(prepared.tokens)
            try:
                completion, limits = await self.transport.send(prepared, self.options.timeout)
                if not completion.whole:  # a transport that let a cut-short reply through
                    raise cut_short(completion)
            except MeshError as e:
                delay = retry_delay(self.options.retry, e, attempt, self.rng)
                if delay is None:
                    return BatchItem(index=index, result=None, error=e, attempts=attempt)
                if e.retry_after is not None and pauses_everyone(e):
                    self.pacer.pause_until(self.clock() + e.retry_after)
                await self.sleep(delay)
                continue
            self.pacer.observe(self.clock(), limits, ticket)
            self.pacer.settle(ticket, completion.usage.total_tokens)
            self.transport.store(prepared, completion)
            return BatchItem(index=index, result=completion, error=None, attempts=attempt)

    async def _paced(self, tokens: float) -> Ticket:
        while (wait := self.pacer.delay(self.clock(), tokens)) > 0:
            await self.sleep(wait)
        return self.pacer.take(self.clock(), tokens)


class _Finisher:
    """What happens once per finished item, in completion order: the abort check, the
    caller's callback, the progress bar."""

    def __init__(self, runner: BatchRunner, on_result: OnResult | None, progress: Progress):
        self.runner, self.on_result, self.progress = runner, on_result, progress

    def __call__(self, item: BatchItem) -> BatchItem:
        runner = self.runner
        if runner.aborted is None and (reason := runner.tracker.record(item.ok)) is not None:
            runner.aborted = Aborted(
                f"batch aborted: {reason}; this item did not finish",
                reason="BATCH_ABORTED",
                metadata={"cause": reason},
            )
        if self.on_result is not None:
            self.on_result(item.index, item.result, item.error)
        self.progress.update(item.ok)
        return item


def _release(held: dict[int, BatchItem], yielded: int, ordered: bool) -> Iterator[BatchItem]:
    """Items that may go to the caller now: all (unordered), or the run of consecutive
    indexes from the next expected one (ordered)."""
    if not ordered:
        items = list(held.values())
        held.clear()
        yield from items
        return
    while (item := held.pop(yielded, None)) is not None:
        yield item
        yielded += 1
