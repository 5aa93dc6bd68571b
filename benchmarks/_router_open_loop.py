"""The open-loop mixed workload of benchmarks/router.py part (c): seeded Poisson arrivals of short
and long requests, sent on schedule whatever is still running, and where the short ones landed."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from benchmarks._common import one_request, prompt_texts
from meshllm.api.v1 import generation_pb2 as gen

SHORT_TOKENS, LONG_TOKENS, LONG_SHARE = 16, 512, 0.2


@dataclass(frozen=True)
class Arrival:
    at_s: float
    max_tokens: int
    prompt: str


@dataclass(frozen=True)
class MixedRecord:
    at_s: float
    """Scheduled arrival, from the start of the run."""
    max_tokens: int
    send_lag_s: float
    latency_s: float
    """Scheduled arrival to the last chunk (0 after an error)."""
    tokens: int
    replica: str
    error: str = ""


@dataclass(frozen=True)
class MixedRun:
    records: list[MixedRecord]
    wall_s: float

    def latencies_ms(self, size: int = 0) -> list[float]:
        """Of the requests that succeeded, all (``size`` 0) or those with max_tokens ``size``."""
        return [
            m.latency_s * 1e3
            for m in self.records
            if not m.error and (not size or m.max_tokens == size)
        ]


def schedule(seed: int, rate: float, duration_s: float) -> list[Arrival]:
    """Poisson arrivals (exponential gaps) with a seeded mix of short and long requests."""
    rng = random.Random(seed)
    texts = prompt_texts(32)
    out: list[Arrival] = []
    at = rng.expovariate(rate)
    while at < duration_s:
        size = LONG_TOKENS if rng.random() < LONG_SHARE else SHORT_TOKENS
        out.append(Arrival(at, size, texts[len(out) % len(texts)]))
        at += rng.expovariate(rate)
    return out


async def arrival_request(
    stub: Any, request: gen.GenerateRequest, at_s: float, due: float
) -> MixedRecord:
    lag = time.perf_counter() - due
    try:
        r = await one_request(stub, request, start=due)
    except grpc.aio.AioRpcError as e:
        return MixedRecord(at_s, request.max_tokens, lag, 0.0, 0, "", e.code().name)
    return MixedRecord(at_s, request.max_tokens, lag, r.latency_s, r.tokens, r.replica)


async def open_loop(stub: Any, model: str, arrivals: Sequence[Arrival]) -> MixedRun:
    """Send each request at its arrival time whatever is still running; wait for all."""
    start = time.perf_counter()
    tasks: list[asyncio.Task[MixedRecord]] = []
    for item in arrivals:
        due = start + item.at_s
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        request = gen.GenerateRequest(
            model=model, prompt=item.prompt, temperature=0.0, max_tokens=item.max_tokens
        )
        tasks.append(asyncio.create_task(arrival_request(stub, request, item.at_s, due)))
    records = await asyncio.gather(*tasks)
    return MixedRun(records, time.perf_counter() - start)


def short_placement(run: MixedRun) -> tuple[int, int, int]:
    """Short requests: (sent behind a long one while a replica had none, arrived while every
    replica had a long one in flight, all)."""
    ok = [m for m in run.records if not m.error]
    longs = [(m.at_s, m.at_s + m.latency_s, m.replica) for m in ok if m.max_tokens == LONG_TOKENS]
    replicas = {m.replica for m in ok}
    missed = everywhere = shorts = 0
    for m in ok:
        if m.max_tokens != SHORT_TOKENS:
            continue
        shorts += 1
        busy = {replica for start, end, replica in longs if start <= m.at_s < end}
        if len(busy) >= len(replicas):
            everywhere += 1
        elif m.replica in busy:
            missed += 1
    return missed, everywhere, shorts
