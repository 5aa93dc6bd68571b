"""SimEngine: a simulated continuous-batching engine for benchmarks (engine ``sim``, never a default).

It behaves like a GPU engine's host loop: up to ``max_batch_size`` sequences run together; every
step costs ``step_ms`` of wall time with the GIL released (the device computing), then
``step_python_us`` plus ``seq_python_us`` per running sequence of Python work holding the GIL
(the engine's own host code: sampling, bookkeeping, ExLlamaV3's generator loop, CTranslate2's
callbacks), and yields one token per running sequence. New requests join at the next step, most
urgent first. Tokens echo the prompt's ids (never an end-of-sequence id), so replies are exact.

Options (strings, as every engine option): ``step_ms``, ``step_python_us``, ``seq_python_us``.
``PROFILES`` holds named settings (option ``profile``); ``h100-exllamav3`` is calibrated to the
H100 ExLlamaV3 figures in docs/benchmarks.md: 223 tokens/s for one stream (4.5 ms a step) and
4,872 tokens/s at 32 (6.6 ms a step) give 4.0 ms on the device, 0.5 ms per step and 65 µs per
sequence of host Python: 4.57 ms (219 tokens/s) at 1 and 6.58 ms (4,863 tokens/s) at 32.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field

from meshllm.api.errors import InvalidArgument
from meshllm.api.types import FinishReason
from meshllm.replica.engines.base import EngineSettings
from meshllm.replica.engines.stream import TokenStream
from meshllm.replica.types import EngineStats, SamplingParams

PROFILES: dict[str, dict[str, float]] = {
    "h100-exllamav3": {"step_ms": 4.0, "step_python_us": 500.0, "seq_python_us": 65.0},
    "light": {"step_ms": 1.0, "step_python_us": 50.0, "seq_python_us": 5.0},
}


@dataclass(frozen=True, kw_only=True)
class SimCosts:
    step_ms: float = 4.0
    """Wall time of one step with the GIL released (the device)."""
    step_python_us: float = 500.0
    """GIL-held Python work per step."""
    seq_python_us: float = 65.0
    """GIL-held Python work per running sequence per step."""

    @classmethod
    def from_options(cls, options: dict[str, str]) -> SimCosts:
        values = dict(PROFILES.get(options.get("profile", "h100-exllamav3"), {}))
        if "profile" in options and options["profile"] not in PROFILES:
            raise InvalidArgument(
                f"sim profile {options['profile']!r} is not one of {', '.join(PROFILES)}"
            )
        for name in ("step_ms", "step_python_us", "seq_python_us"):
            if name in options:
                try:
                    values[name] = float(options[name])
                except ValueError:
                    raise InvalidArgument(
                        f"sim option {name}: {options[name]!r} is not a number"
                    ) from None
        return cls(**values)

    def step_s(self, running: int) -> float:
        """The whole cost of one step at ``running`` sequences (the engine's raw ceiling)."""
        return (self.step_ms * 1e3 + self.step_python_us + self.seq_python_us * running) / 1e6


def hold_gil(seconds: float) -> None:
    """Python work: a busy loop that holds the GIL (other threads get it only at switches)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@dataclass(order=True)
class _Waiting:
    key: tuple[int, int]
    prompt: tuple[int, ...] = field(compare=False)
    stream: TokenStream = field(compare=False)


class SimEngine:
    name = "sim"

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.costs = SimCosts.from_options(settings.options)
        self.max_batch = settings.max_batch_size or 64
        self._waiting: list[_Waiting] = []
        self._running: list[tuple[tuple[int, ...], TokenStream]] = []
        self._seq = itertools.count()
        self._lock = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sim-engine", daemon=True)
        self._thread.start()

    def submit(
        self, prompt_ids: tuple[int, ...], sampling: SamplingParams, priority: int
    ) -> TokenStream:
        if self._loop is None:
            raise RuntimeError("engine not started")
        stream = TokenStream(self._loop, max_tokens=sampling.max_tokens, eos_ids=frozenset())
        prompt = tuple(t for t in prompt_ids if t not in self.settings.eos_ids) or (0,)
        with self._lock:
            heapq.heappush(self._waiting, _Waiting((-priority, next(self._seq)), prompt, stream))
            self._lock.notify()
        return stream

    def stats(self) -> EngineStats:
        with self._lock:
            streams = [w.stream for w in self._waiting] + [s for _, s in self._running]
            queued, running = len(self._waiting), len(self._running)
        left = sum(s.max_tokens - s.generated for s in streams)
        return EngineStats(
            queued=queued, running=running, tokens_in_flight=left, capacity=self.max_batch
        )

    def _admit(self) -> None:
        """Under the lock: drop cancelled waiters, fill free slots most urgent first."""
        while self._waiting and len(self._running) < self.max_batch:
            item = heapq.heappop(self._waiting)
            if item.stream.cancelled:
                item.stream.finish(FinishReason.CANCELLED)
                continue
            item.stream.mark_started()
            self._running.append((item.prompt, item.stream))

    def _run(self) -> None:
        step = 0
        while True:
            with self._lock:
                while not self._stop and not self._running and not self._waiting:
                    self._lock.wait()
                if self._stop:
                    return
                self._admit()
                batch = list(self._running)
            time.sleep(self.costs.step_ms / 1e3)  # the device: GIL released
            hold_gil((self.costs.step_python_us + self.costs.seq_python_us * len(batch)) / 1e6)
            done = [s for p, s in batch if s.push(p[step % len(p)])]
            step += 1
            if done:
                with self._lock:
                    self._running = [(p, s) for p, s in self._running if s not in done]
                for s in done:
                    if s.cancelled:
                        s.finish(FinishReason.CANCELLED)

    async def close(self) -> None:
        with self._lock:
            self._stop = True
            streams = [w.stream for w in self._waiting] + [s for _, s in self._running]
            self._waiting, self._running = [], []
            self._lock.notify()
        for s in streams:
            s.cancel()
            s.finish(FinishReason.CANCELLED)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
