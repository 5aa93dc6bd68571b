"""Prometheus metrics shared by the router and the replica: one registry per server (so several
servers can live in one process, as in tests) with the process's own metrics, request counters
and latency histograms. Every metric names its model with the one label ``model``; the
``/metrics`` endpoint is ``meshllm.server.exposition``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)

from meshllm.api.errors import status_name
from meshllm.server.logs import log_request

T = TypeVar("T")

# From a few milliseconds (a tiny model's first token) to minutes (a long reply on a busy GPU).
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

# Per generated token: a tenth of a millisecond (a tiny model on a CPU) to seconds (a long
# context on a busy GPU).
TOKEN_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
)


def server_registry() -> CollectorRegistry:
    """A registry of one server's metrics, with the process's own: CPU, memory, open files and
    start time (``process_*``, Linux), the Python version and the garbage collector."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


@dataclass
class RequestRecord:
    """What one request did, filled in while it runs; recorded when it ends."""

    model: str
    request_id: str = ""
    replica: str = ""
    tenant: str = ""
    """Who asked (router only; empty on a replica, which never sees API keys)."""
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    decode_s: float | None = None
    """First generated token to the last, as the engine measured it (the reply's timing)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    """How the reply ended (``stop``, ``length``, ...), once its last chunk came."""
    code: str = "OK"

    def tokens(self, count: int) -> None:
        if count and self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self.completion_tokens += count

    def time_per_output_token(self) -> float | None:
        """Mean time per token after the first (None before the reply's timing came, or for
        fewer than two tokens). From the engine's decode time, not from when messages arrived:
        tokens that queue up behind a slow reader go out together in one message."""
        if self.decode_s is None or self.completion_tokens < 2:
            return None
        return self.decode_s / (self.completion_tokens - 1)


class RequestMetrics:
    """``<prefix>_requests_total{model,code}``, time to first token, time per output token and
    request duration histograms, and prompt and generated token counters, all by model."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.requests = Counter(
            f"{prefix}_requests",
            "Requests by model and final gRPC status code.",
            ["model", "code"],
            registry=registry,
        )
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            "Request start to the first generated token.",
            ["model"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            f"{prefix}_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request (engine decode time).",
            ["model"],
            registry=registry,
            buckets=TOKEN_BUCKETS,
        )
        self.duration = Histogram(
            f"{prefix}_request_duration_seconds",
            "Request start to its end, by model.",
            ["model"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.prompt_tokens = Counter(
            f"{prefix}_prompt_tokens",
            "Prompt tokens of finished requests.",
            ["model"],
            registry=registry,
        )
        self.generated_tokens = Counter(
            f"{prefix}_generated_tokens",
            "Tokens generated (streamed) for requests.",
            ["model"],
            registry=registry,
        )

    @contextlib.contextmanager
    def track(
        self,
        model: str,
        request_id: str = "",
        on_end: Callable[[RequestRecord], None] | None = None,
    ) -> Iterator[RequestRecord]:
        """Record one request (metrics and its access log line): its status code comes from how
        the block ends. ``on_end`` sees the finished record too (e.g. to end the request's span
        with the same status)."""
        record = RequestRecord(model=model, request_id=request_id)
        try:
            yield record
        except BaseException as e:
            record.code = status_name(e)
            raise
        finally:
            if on_end is not None:
                on_end(record)
            self._record(record)

    def _record(self, r: RequestRecord) -> None:
        duration = time.perf_counter() - r.started
        self.requests.labels(r.model, r.code).inc()
        self.duration.labels(r.model).observe(duration)
        if r.first_token_s is not None:
            self.ttft.labels(r.model).observe(r.first_token_s)
        tpot = r.time_per_output_token()
        if tpot is not None:
            self.tpot.labels(r.model).observe(tpot)
        self.prompt_tokens.labels(r.model).inc(r.prompt_tokens)
        self.generated_tokens.labels(r.model).inc(r.completion_tokens)
        ttft_ms = round(r.first_token_s * 1000, 2) if r.first_token_s is not None else None
        tenant = {"tenant": r.tenant} if r.tenant else {}
        log_request(
            {
                "request_id": r.request_id,
                **tenant,
                "model": r.model,
                "replica": r.replica,
                "code": r.code,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "ttft_ms": ttft_ms,
                "duration_ms": round(duration * 1000, 2),
            }
        )


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout_s: float = 5.0) -> T:
    """Run ``fn`` on the server's event loop and wait for it: the HTTP thread that serves a
    scrape must not read state the loop is changing."""

    async def call() -> T:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout_s)
