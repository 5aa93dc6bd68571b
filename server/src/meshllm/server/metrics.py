"""Prometheus metrics shared by the router and the replica: one registry per server (so several
servers can live in one process, as in tests), request counters and latency histograms, and the
``/metrics`` HTTP endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

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
    prompt_tokens: int = 0
    completion_tokens: int = 0
    code: str = "OK"

    def tokens(self, count: int) -> None:
        if count and self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self.completion_tokens += count


class RequestMetrics:
    """``<prefix>_requests_total{model,code}``, time to first token and request duration
    histograms, and prompt and generated token counters, all by model."""

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


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` over HTTP on a daemon thread; returns the server and its port."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_port)
