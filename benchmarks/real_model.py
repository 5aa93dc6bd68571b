"""Real-model benchmark: SmolLM2-135M-Instruct (int8) raw in CTranslate2, through a replica,
and through a router in front of that replica, in one run.

1. RAW: ``Generator.generate_batch`` in this process on the chat-templated prompts, greedy,
   ``max_length`` = ``--max-tokens``, batch sizes 1, 8, 32, every thread layout of
   ``benchmarks/_common.raw_configs``; the best layout is the reference. A reply ends at
   ``<|im_end|>`` or at max tokens, the same token as served (greedy on the same prompt ids).
2. REPLICA: ``meshllm-replica --model smollm2`` in its own process; C closed-loop clients
   (C = 1, 8, 32) call ``GenerateStream`` with the chat messages, temperature 0.
3. ROUTER: ``meshllm-router`` in its own process in front of the same replica, same clients.

Per level: tokens/s, ratio to raw, client-side TTFT p50/p99. Run from the repository root
(after ``make setup``, which prepares the model)::

    python benchmarks/real_model.py           # about three minutes on 2 cores
    python benchmarks/real_model.py --quick   # smoke run

Figures are printed and written to ``benchmarks/results/real_model.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks._common as a script

from benchmarks._common import (
    best_raw,
    closed_loop,
    exit_on_sigterm,
    machine_info,
    measure_raw,
    percentile,
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
from meshllm.replica.models import smollm2
from meshllm.replica.tokenizer import ModelTokenizer
from meshllm.replica.types import ChatMessage

LEVELS = (1, 8, 32)
MODEL = "smollm2"
DEFAULT_OUT = Path("benchmarks/results/real_model.json")
TOPICS = (
    "a lighthouse keeper", "a lost city", "the first day of school", "a dragon who cannot fly",
    "a voyage to Mars", "an old clock", "a forest in winter", "a robot chef",
)  # fmt: skip


def questions() -> list[str]:
    return [f"Write a long story about {t}." for t in TOPICS]


def chat_request(question: str, max_tokens: int) -> gen.GenerateRequest:
    return gen.GenerateRequest(
        model=MODEL,
        messages=[gen.ChatMessage(role="user", content=question)],
        temperature=0.0,
        repetition_penalty=1.0,
        max_tokens=max_tokens,
    )


def summarize(records: Sequence[Any], wall: float) -> dict[str, float]:
    ttft = [r.ttft_s * 1e3 for r in records]
    tokens = sum(r.tokens for r in records)
    return {
        "requests": len(records),
        "tokens_per_s": tokens / wall,
        "tokens_per_request": tokens / max(1, len(records)),
        "ttft_p50_ms": percentile(ttft, 0.5),
        "ttft_p99_ms": percentile(ttft, 0.99),
    }


async def measure_path(
    address: str, procs: Sequence[Any], max_tokens: int, duration: float, warmup: float
) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    qs = questions()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gen_grpc.GenerationStub(channel)
        await wait_ready(stub, list(procs), MODEL)
        for c in LEVELS:
            requests = [chat_request(qs[i % len(qs)], max_tokens) for i in range(c)]
            await closed_loop(stub, requests, warmup)
            records, wall = await closed_loop(stub, requests, duration)
            out[c] = summarize(records, wall)
            print(f"  {address} concurrency {c:>2}: {out[c]['tokens_per_s']:7.1f} tok/s")
    return out


async def measure_served(
    max_tokens: int, duration: float, warmup: float
) -> dict[str, dict[int, dict[str, float]]]:
    replica_port, router_port = free_port(), free_port()
    replica = start_process(replica_args(replica_port, MODEL))
    router = start_process(router_args(router_port, [replica_port]))
    try:
        direct = await measure_path(
            f"127.0.0.1:{replica_port}", [replica], max_tokens, duration, warmup
        )
        routed = await measure_path(
            f"127.0.0.1:{router_port}", [replica, router], max_tokens, duration, warmup
        )
        return {"replica": direct, "router": routed}
    finally:
        stop_processes([router, replica])


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--duration", type=float, default=None, help="seconds per level (15)")
    p.add_argument("--raw-seconds", type=float, default=None, help="seconds per raw cell (4)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="smoke run: short levels, 32 tokens")
    args = p.parse_args(argv)
    exit_on_sigterm()
    max_tokens = 32 if args.quick else args.max_tokens
    duration = args.duration or (3.0 if args.quick else 15.0)
    raw_seconds = args.raw_seconds or (1.0 if args.quick else 4.0)
    warmup = 1.0 if args.quick else 3.0

    folder = smollm2.ensure_model()
    tok = ModelTokenizer(folder)
    qs = questions()
    prompts = [
        tok.tokens(tok.encode_chat([ChatMessage("user", qs[i % len(qs)])]))
        for i in range(max(LEVELS))
    ]
    print(f"raw CTranslate2 on {folder.name}:")
    cells = measure_raw(folder, prompts, LEVELS, max_tokens, raw_seconds, callback=True)
    best = best_raw(cells)
    print("served (replica process, then router + replica):")
    served = asyncio.run(measure_served(max_tokens, duration, warmup))

    levels = []
    print(
        f"\n{'C':>3} {'raw tok/s':>10} {'replica':>16} {'router':>16}  TTFT p50/p99 ms raw | replica | router"
    )
    for c in LEVELS:
        raw, rep, rou = best[c], served["replica"][c], served["router"][c]
        row: dict[str, Any] = {
            "concurrency": c,
            "raw": asdict(raw),
            "replica": rep | {"ratio_to_raw": rep["tokens_per_s"] / raw.tokens_per_s},
            "router": rou | {"ratio_to_raw": rou["tokens_per_s"] / raw.tokens_per_s},
        }
        levels.append(row)
        print(
            f"{c:>3} {raw.tokens_per_s:>10.1f} "
            f"{rep['tokens_per_s']:>8.1f} ({row['replica']['ratio_to_raw']:.2f}) "
            f"{rou['tokens_per_s']:>8.1f} ({row['router']['ratio_to_raw']:.2f})  "
            f"{raw.ttft_p50_ms:.0f}/{raw.ttft_p99_ms:.0f} | "
            f"{rep['ttft_p50_ms']:.0f}/{rep['ttft_p99_ms']:.0f} | "
            f"{rou['ttft_p50_ms']:.0f}/{rou['ttft_p99_ms']:.0f}"
        )
    report = {
        "benchmark": "real_model",
        "model": folder.name,
        "machine": machine_info(),
        "max_tokens": max_tokens,
        "duration_s": duration,
        "raw_cells": [asdict(c) for c in cells],
        "levels": levels,
    }
    write_json(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
