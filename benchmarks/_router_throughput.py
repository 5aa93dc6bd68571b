"""Part (b) of benchmarks/router.py: tokens/s through the router, a pass-through relay and
directly, against raw ``generate_batch`` (see that script's docstring)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from benchmarks._common import (
    Process,
    RawCell,
    best_raw,
    closed_loop,
    machine_info,
    measure_raw,
    percentile,
    prompt_texts,
    prompt_tokens,
    replica_args,
    router_args,
    start_process,
    wait_ready,
)
from benchmarks._router_paths import (
    Endpoint,
    chunks_per_request,
    cores_busy,
    pass_through_args,
    requests_for,
    rotated,
    stop_servers,
    timed_phase,
)
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client.local import free_port
from meshllm.replica.models.tiny import BENCH

THROUGHPUT_CONCURRENCY = 32
THROUGHPUT_MAX_TOKENS = 128
TARGET_THROUGHPUT_RATIO = 0.8


@dataclass(frozen=True)
class ThroughputPath:
    path: str
    requests: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    round_tokens_per_s: list[float]
    ttft_p50_ms: float
    ttft_p99_ms: float
    chunks_per_request: float
    cores_busy: dict[str, float]


@dataclass(frozen=True)
class Throughput:
    paths: list[ThroughputPath]
    raw: list[RawCell]
    raw_best: RawCell
    routed_vs_raw: float
    direct_vs_raw: float
    routed_vs_direct: float
    pass_through_vs_direct: float

    def path(self, name: str) -> ThroughputPath:
        return next(p for p in self.paths if p.path == name)


# -- measurement --------------------------------------------------------------------------------


def summarize_throughput_path(ep: Endpoint) -> ThroughputPath:
    tokens = sum(r.tokens for r in ep.records)
    return ThroughputPath(
        path=ep.name,
        requests=len(ep.records),
        wall_s=ep.wall_s,
        tokens=tokens,
        tokens_per_s=tokens / ep.wall_s,
        round_tokens_per_s=list(ep.round_values),
        ttft_p50_ms=percentile([r.ttft_s * 1e3 for r in ep.records], 0.5),
        ttft_p99_ms=percentile([r.ttft_s * 1e3 for r in ep.records], 0.99),
        chunks_per_request=chunks_per_request(ep),
        cores_busy=cores_busy(ep),
    )


async def measure_throughput(
    ports: Mapping[str, int],
    procs: Mapping[str, Process],
    *,
    rounds: int,
    round_s: float,
    warmup_s: float,
) -> list[ThroughputPath]:
    eps = [Endpoint(name, port) for name, port in ports.items()]
    requests = requests_for(BENCH.name, THROUGHPUT_CONCURRENCY, THROUGHPUT_MAX_TOKENS)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{ep.port}") for ep in eps]
    try:
        for ep, channel in zip(eps, channels, strict=True):
            ep.stub = gen_grpc.GenerationStub(channel)
        router = next(ep for ep in eps if ep.name == "router")
        await wait_ready(router.stub, list(procs.values()), BENCH.name, 1)
        for ep in eps:
            await closed_loop(ep.stub, requests, warmup_s * 2)
        for turn in range(rounds):
            for ep in rotated(eps, turn):
                records, wall = await timed_phase(ep, requests, round_s, procs)
                ep.round_values.append(sum(r.tokens for r in records) / wall)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    paths = [summarize_throughput_path(ep) for ep in eps]
    for p in paths:
        print(f"  {p.path:>12} concurrency {THROUGHPUT_CONCURRENCY}: {p.tokens_per_s:8.0f} tok/s")
    return paths


def run_throughput(
    model_dir: Path, *, rounds: int, round_s: float, warmup_s: float, raw_seconds: float
) -> Throughput:
    """Serve the bench model directly, through a relay and through a router; then, with the
    servers stopped, time raw ``generate_batch`` at the same batch size."""
    ports = {"direct": free_port(), "pass-through": free_port(), "router": free_port()}
    procs: dict[str, Process] = {}
    try:
        procs["replica"] = start_process(
            replica_args(ports["direct"], BENCH.name, "--replica-id", "r0")
        )
        procs["pass-through"] = start_process(
            pass_through_args(ports["pass-through"], ports["direct"])
        )
        procs["router"] = start_process(router_args(ports["router"], [ports["direct"]]))
        paths = asyncio.run(
            measure_throughput(ports, procs, rounds=rounds, round_s=round_s, warmup_s=warmup_s)
        )
    finally:
        stop_servers(procs)
    # The servers are gone, so the raw runs have the cores to themselves.
    prompts = prompt_tokens(model_dir, prompt_texts(THROUGHPUT_CONCURRENCY))
    cells = measure_raw(
        model_dir,
        prompts,
        [THROUGHPUT_CONCURRENCY],
        THROUGHPUT_MAX_TOKENS,
        raw_seconds,
        callback=False,
    )
    raw = best_raw(cells)[THROUGHPUT_CONCURRENCY]
    by = {p.path: p for p in paths}
    return Throughput(
        paths=paths,
        raw=cells,
        raw_best=raw,
        routed_vs_raw=by["router"].tokens_per_s / raw.tokens_per_s,
        direct_vs_raw=by["direct"].tokens_per_s / raw.tokens_per_s,
        routed_vs_direct=by["router"].tokens_per_s / by["direct"].tokens_per_s,
        pass_through_vs_direct=by["pass-through"].tokens_per_s / by["direct"].tokens_per_s,
    )


# -- report -------------------------------------------------------------------------------------


def throughput_target(tp: Throughput) -> dict[str, dict[str, Any]]:
    ratio = tp.routed_vs_raw
    return {
        f"routed_vs_raw_tokens_per_s_at_{THROUGHPUT_CONCURRENCY}": {
            "target": f">= {TARGET_THROUGHPUT_RATIO}",
            "value": ratio,
            "met": ratio >= TARGET_THROUGHPUT_RATIO,
        },
    }


def throughput_notes(tp: Throughput) -> list[str]:
    router, direct, hop = tp.path("router"), tp.path("direct"), tp.path("pass-through")
    busy = router.cores_busy
    notes = [
        f"(b) at concurrency {THROUGHPUT_CONCURRENCY}: routed {router.tokens_per_s:.0f} tok/s, "
        f"pass-through {hop.tokens_per_s:.0f}, direct {direct.tokens_per_s:.0f}, raw "
        f"{tp.raw_best.tokens_per_s:.0f} ({tp.raw_best.config}); routed/direct "
        f"{tp.routed_vs_direct:.2f}, pass-through/direct {tp.pass_through_vs_direct:.2f}, "
        f"direct/raw {tp.direct_vs_raw:.2f}, so routed/raw {tp.routed_vs_raw:.2f}. Cores busy "
        f"while routed: router {busy.get('router', 0.0):.2f}, replica "
        f"{busy.get('replica', 0.0):.2f}, client {busy.get('client', 0.0):.2f} (pass-through "
        f"process {hop.cores_busy.get('pass-through', 0.0):.2f}; direct: replica "
        f"{direct.cores_busy.get('replica', 0.0):.2f}, client "
        f"{direct.cores_busy.get('client', 0.0):.2f}) of {machine_info()['cpu_count']}. Chunks "
        f"per request: {router.chunks_per_request:.0f} routed, {hop.chunks_per_request:.0f} "
        f"pass-through, {direct.chunks_per_request:.0f} direct.",
    ]
    if tp.routed_vs_raw < TARGET_THROUGHPUT_RATIO:
        notes.append(
            f"(b) target not met: the replica alone reaches {tp.direct_vs_raw:.2f} of raw (the "
            f"gap benchmarks/replica.py measures: per-token callbacks and messages, and the "
            f"client sharing the cores), which caps routed/raw there before the router costs "
            f"anything; the router itself changes the direct throughput by "
            f"{tp.routed_vs_direct - 1:+.0%} (a bare relay by {tp.pass_through_vs_direct - 1:+.0%})"
            f", using {busy.get('router', 0.0):.2f} cores to relay every chunk on a machine whose "
            f"2 cores the replica and client already fill."
        )
    return notes


def print_throughput(tp: Throughput, *, rounds: int, round_s: float) -> None:
    print(
        f"\n(b) Throughput: {BENCH.name} model, concurrency {THROUGHPUT_CONCURRENCY}, "
        f"max_tokens {THROUGHPUT_MAX_TOKENS}, {rounds} rotating rounds of "
        f"{round_s:g} s per path"
    )
    print(
        f"{'path':<12} {'tok/s':>6} {'rounds':>16} {'TTFT p50':>9} {'p99':>8} "
        f"{'chunks/req':>10} {'cores: hop':>11} {'replica':>8} {'client':>7}"
    )
    for p in tp.paths:
        rounds_text = "/".join(f"{v:.0f}" for v in p.round_tokens_per_s)
        busy = p.cores_busy
        print(
            f"{p.path:<12} {p.tokens_per_s:>6.0f} {rounds_text:>16} {p.ttft_p50_ms:>7.1f}ms "
            f"{p.ttft_p99_ms:>6.1f}ms {p.chunks_per_request:>10.1f} "
            f"{busy.get(p.path, 0.0):>11.2f} {busy.get('replica', 0.0):>8.2f} "
            f"{busy.get('client', 0.0):>7.2f}"
        )
    raw = tp.raw_best
    print(
        f"{'raw':<12} {raw.tokens_per_s:>6.0f}   best layout {raw.config} "
        f"({raw.inter_threads}x{raw.intra_threads}), batch {raw.batch_size}, no server "
        f"running"
    )
    print(
        f"routed/raw {tp.routed_vs_raw:.2f}   direct/raw {tp.direct_vs_raw:.2f}   "
        f"routed/direct {tp.routed_vs_direct:.2f}   pass-through/direct "
        f"{tp.pass_through_vs_direct:.2f}"
    )
