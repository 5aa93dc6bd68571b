"""HTTP front benchmark: the router's OpenAI-compatible API against its gRPC API, same router.

One replica process on the ``bench`` model (int8, d_model 256, 4 layers, CPU) and one router
process in front of it with ``--http-port``: both fronts share the router, its forwarder and the
replica, so the difference between them is the front alone. The client is this process:

- gRPC: one grpc.aio channel, ``GenerateStream``;
- HTTP: one aiohttp session (keep-alive, a connection per concurrent client), ``POST
  /v1/completions`` with ``"stream": true`` and ``stream_options.include_usage``; the SSE lines
  are parsed as JSON, as an OpenAI client would.

Both send the same prompt with max_tokens ``--max-tokens`` (64) and temperature 0. At
concurrency C (1 and 32), C closed-loop clients run for ``--round`` seconds per front; rounds
alternate the order of the fronts so drift hits both alike, after a warm-up of each. TTFT = send
to the first chunk (gRPC) or first ``data:`` event (HTTP) at the client; tokens/s = completion
tokens (from the final usage) / wall time of the round, pooled over rounds. The router's CPU
and client's CPU time per request (psutil; the client is this process) are recorded per front:
on a shared machine they show what each front costs better than the latencies do.

Targets: HTTP adds under 1 ms TTFT p50 at concurrency 1, and keeps >= 0.9 of the gRPC front's
tokens/s at 32. Run it from the repository root::

    python benchmarks/http_api.py            # about two minutes
    python benchmarks/http_api.py --quick    # smoke run

Figures are printed and written as JSON to ``benchmarks/results/http.json`` (``--out``).
(Not ``benchmarks/http.py``: run as a script, a file of that name shadows the standard library's
``http`` package, which aiohttp imports.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks._common as a script

from benchmarks._common import (
    Process,
    cpu_seconds,
    exit_on_sigterm,
    machine_info,
    percentile,
    print_targets,
    replica_args,
    router_args,
    start_process,
    stop_processes,
    wait_ready,
    write_json,
)
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client.local import free_port
from meshllm.replica.models.tiny import BENCH, ensure_model

DEFAULT_OUT = Path("benchmarks/results/http.json")
LEVELS = (1, 32)
PROMPT = "Write a short story about a lighthouse keeper."
TARGET_ADDED_P50_MS = 1.0
TARGET_TOKENS_RATIO = 0.9


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    tokens: int


@dataclass(frozen=True)
class FrontResult:
    front: str
    requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tokens_per_s: float
    router_cpu_ms_per_request: float
    client_cpu_ms_per_request: float


@dataclass(frozen=True)
class Level:
    concurrency: int
    fronts: list[FrontResult]
    added_ttft_p50_ms: float
    added_ttft_p99_ms: float
    tokens_ratio: float


OneRequest = Callable[[], Awaitable[Sample]]


async def grpc_request(stub: Any, max_tokens: int) -> Sample:
    request = gen.GenerateRequest(
        model="bench", prompt=PROMPT, max_tokens=max_tokens, temperature=0.0
    )
    start = time.perf_counter()
    first, tokens = None, 0
    async for chunk in stub.GenerateStream(request):
        if first is None:
            first = time.perf_counter()
        if chunk.finish_reason:
            tokens = chunk.usage.completion_tokens
    return Sample((first or time.perf_counter()) - start, tokens)


async def http_request(session: aiohttp.ClientSession, url: str, max_tokens: int) -> Sample:
    body = {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens = None, 0
    async with session.post(url, json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {await reply.text()}")
        async for line in reply.content:
            if not line.startswith(b"data: "):
                continue
            if first is None:
                first = time.perf_counter()
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return Sample((first or time.perf_counter()) - start, tokens)


async def closed_loop(one: OneRequest, clients: int, seconds: float) -> tuple[list[Sample], float]:
    start = time.perf_counter()
    end = start + seconds

    async def client() -> list[Sample]:
        out = []
        while time.perf_counter() < end:
            out.append(await one())
        return out

    per_client = await asyncio.gather(*(client() for _ in range(clients)))
    return [s for samples in per_client for s in samples], time.perf_counter() - start


async def measure_level(
    fronts: dict[str, OneRequest],
    *,
    router: Process,
    clients: int,
    rounds: int,
    round_s: float,
    warmup_s: float,
) -> Level:
    for one in fronts.values():
        await closed_loop(one, clients, warmup_s)
    samples: dict[str, list[Sample]] = {name: [] for name in fronts}
    wall = dict.fromkeys(fronts, 0.0)
    cpu = {name: {"router": 0.0, "client": 0.0} for name in fronts}
    names = list(fronts)
    for r in range(rounds):
        for name in names[r % 2 :] + names[: r % 2]:  # alternate the order every round
            before = cpu_seconds({"router": router})
            got, elapsed = await closed_loop(fronts[name], clients, round_s)
            after = cpu_seconds({"router": router})
            for who in ("router", "client"):
                cpu[name][who] += after[who] - before[who]
            samples[name] += got
            wall[name] += elapsed
    results = []
    for name in names:
        ttft = [s.ttft_s for s in samples[name]]
        results.append(
            FrontResult(
                front=name,
                requests=len(ttft),
                ttft_p50_ms=round(percentile(ttft, 0.5) * 1e3, 3),
                ttft_p99_ms=round(percentile(ttft, 0.99) * 1e3, 3),
                tokens_per_s=round(sum(s.tokens for s in samples[name]) / wall[name], 1),
                router_cpu_ms_per_request=round(cpu[name]["router"] * 1e3 / max(len(ttft), 1), 3),
                client_cpu_ms_per_request=round(cpu[name]["client"] * 1e3 / max(len(ttft), 1), 3),
            )
        )
    grpc_r, http_r = results
    return Level(
        concurrency=clients,
        fronts=results,
        added_ttft_p50_ms=round(http_r.ttft_p50_ms - grpc_r.ttft_p50_ms, 3),
        added_ttft_p99_ms=round(http_r.ttft_p99_ms - grpc_r.ttft_p99_ms, 3),
        tokens_ratio=round(http_r.tokens_per_s / grpc_r.tokens_per_s, 3),
    )


async def run(opts: argparse.Namespace) -> list[Level]:
    ensure_model(BENCH)
    replica_port, router_port, http_port = free_port(), free_port(), free_port()
    replica = start_process(replica_args(replica_port, "bench"))
    router = start_process(
        router_args(
            router_port, [replica_port], "--http-port", str(http_port), "--stale-after", "10"
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router_port}") as channel:
            stub = gen_grpc.GenerationStub(channel)
            await wait_ready(stub, [replica, router], "bench", replicas=1)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                url = f"http://127.0.0.1:{http_port}/v1/completions"
                fronts: dict[str, OneRequest] = {
                    "grpc": lambda: grpc_request(stub, opts.max_tokens),
                    "http": lambda: http_request(session, url, opts.max_tokens),
                }
                levels = []
                for clients in LEVELS:
                    print(f"concurrency {clients}: {opts.rounds} rounds of {opts.round:g} s ...")
                    levels.append(
                        await measure_level(
                            fronts,
                            router=router,
                            clients=clients,
                            rounds=opts.rounds,
                            round_s=opts.round,
                            warmup_s=opts.warmup,
                        )
                    )
                return levels
    finally:
        stop_processes([router, replica])


def print_levels(levels: Sequence[Level]) -> None:
    print(
        f"\n{'C':>3} {'front':6} {'requests':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'tokens/s':>9} {'router CPU/req':>15} {'client CPU/req':>15}"
    )
    for level in levels:
        for f in level.fronts:
            print(
                f"{level.concurrency:>3} {f.front:6} {f.requests:>8} {f.ttft_p50_ms:>7.2f}ms "
                f"{f.ttft_p99_ms:>7.2f}ms {f.tokens_per_s:>9.0f} {f.router_cpu_ms_per_request:>13.3f}ms"
                f" {f.client_cpu_ms_per_request:>13.3f}ms"
            )
        print(
            f"    HTTP - gRPC: TTFT p50 {level.added_ttft_p50_ms:+.2f} ms, p99 "
            f"{level.added_ttft_p99_ms:+.2f} ms; tokens/s ratio {level.tokens_ratio:.3f}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=None, help="rounds per level (4)")
    p.add_argument("--round", type=float, default=None, help="seconds per front and round (4)")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per front (1)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (64)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file ({DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="smoke run: one short round")
    opts = p.parse_args(argv)
    opts.rounds = opts.rounds or (1 if opts.quick else 4)
    opts.round = opts.round or (1.0 if opts.quick else 4.0)
    exit_on_sigterm()
    load_before = os.getloadavg()
    levels = asyncio.run(run(opts))
    load_after = os.getloadavg()
    print(f"load average (1 min) before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    print_levels(levels)
    one, many = levels
    met = {
        "HTTP added TTFT p50 at concurrency 1 (ms)": {
            "target": "< 1",
            "value": one.added_ttft_p50_ms,
            "met": one.added_ttft_p50_ms < TARGET_ADDED_P50_MS,
        },
        "HTTP / gRPC tokens/s at concurrency 32": {
            "target": ">= 0.9",
            "value": many.tokens_ratio,
            "met": many.tokens_ratio >= TARGET_TOKENS_RATIO,
        },
    }
    print_targets(met)
    report = {
        "machine": machine_info(),
        # the machine is shared: what else ran shows here (2 cores: above 2, everything waits)
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "settings": {"rounds": opts.rounds, "round_s": opts.round, "max_tokens": opts.max_tokens},
        "levels": [asdict(level) for level in levels],
        "targets": met,
    }
    write_json(opts.out, report)


if __name__ == "__main__":
    main()
