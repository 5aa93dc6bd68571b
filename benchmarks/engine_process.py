"""Engine-process benchmark: the simulated engine raw, and behind a replica with the engine in the
front process (``--in-process-engine``) and in its own process (the default), in one run.

The engine is ``sim`` (``meshllm.replica.engines.sim``): continuous batching, every step
``step_ms`` with the GIL released (the device) plus GIL-held Python per step and per sequence (an
engine's own host work). Profile ``h100-exllamav3`` is calibrated to the H100 ExLlamaV3 figures
(docs/benchmarks.md). Its replies echo the prompt, ``--max-tokens`` tokens each.

1. RAW: the engine in this process, C closed-loop consumers (C = 1, 32, 64, 128) submitting and
   draining back to back; tokens/s and submit-to-first-token.
2. REPLICA (each mode): ``python -m meshllm.replica --model demo --engine sim`` and C
   closed-loop ``GenerateStream`` clients on one channel; tokens/s and TTFT at the client.
3. Ratio replica / raw at each C, and the targets: >= 0.85 of raw at 32 and 64 streams, TTFT
   p99 at 32 under 2x raw's.

    python benchmarks/engine_process.py               # about three minutes
    python benchmarks/engine_process.py --quick       # smoke run

Figures print and go to ``benchmarks/results/engine-process.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks._common as a script

from benchmarks._common import (
    closed_loop,
    exit_on_sigterm,
    machine_info,
    replica_args,
    start_process,
    stop_processes,
    wait_ready,
    write_json,
)
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client.local import free_port
from meshllm.replica.engines.base import EngineSettings
from meshllm.replica.engines.sim import SimCosts, SimEngine
from meshllm.replica.types import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


async def raw_level(
    options: dict[str, str], streams: int, tokens: int, seconds: float
) -> dict[str, Any]:
    engine = SimEngine(EngineSettings(model_dir=Path("."), max_batch_size=128, options=options))
    await engine.start()
    sampling = SamplingParams(temperature=0.0, max_tokens=tokens)
    ttfts: list[float] = []
    done = 0
    end = time.perf_counter() + seconds

    async def consumer(i: int) -> None:
        nonlocal done
        while time.perf_counter() < end:
            sent = time.perf_counter()
            stream = engine.submit((10 + i % 200,), sampling, 0)
            first = True
            while ids := await stream.read(1):
                if first:
                    ttfts.append(time.perf_counter() - sent)
                    first = False
                done += len(ids)

    started = time.perf_counter()
    await asyncio.gather(*(consumer(i) for i in range(streams)))
    elapsed = time.perf_counter() - started
    await engine.close()
    return _cell(done / elapsed, ttfts)


def _cell(
    tokens_per_s: float, ttfts: list[float], server: list[float] | None = None
) -> dict[str, Any]:
    extra = (
        {
            "server_ttft_p50_ms": round(statistics.median(server), 2),
            "server_ttft_p99_ms": round(pct(server, 0.99), 2),
        }
        if server
        else {}
    )
    return extra | {
        "tokens_per_s": round(tokens_per_s, 1),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1e3, 2) if ttfts else 0.0,
        "ttft_p99_ms": round(pct(ttfts, 0.99) * 1e3, 2),
        "requests": len(ttfts),
    }


async def replica_levels(
    mode: str, options: dict[str, str], levels: list[int], tokens: int, seconds: float
) -> dict[int, dict[str, Any]]:
    port = free_port()
    flags = ["--engine", "sim", "--max-batch-size", "128", "--default-coalesce-ms", "0"]
    flags += [a for k, v in options.items() for a in ("--option", f"{k}={v}")]
    if mode == "in-process":
        flags.append("--in-process-engine")
    proc = start_process(replica_args(port, "demo", *flags))
    out: dict[int, dict[str, Any]] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gen_grpc.GenerationStub(channel)
            await wait_ready(stub, [proc], "demo")
            for streams in levels:
                requests = [
                    gen.GenerateRequest(
                        model="demo", prompt=f"s{i}", max_tokens=tokens, temperature=0.0
                    )
                    for i in range(streams)
                ]
                await closed_loop(stub, requests[:4], 0.5)  # warm-up
                records, elapsed = await closed_loop(stub, requests, seconds)
                total = sum(r.tokens for r in records)
                out[streams] = _cell(
                    total / elapsed,
                    [r.ttft_s for r in records],
                    [r.server_ttft_ms for r in records],
                )
                print(f"  {mode:14} {streams:4} streams: {out[streams]}", flush=True)
    finally:
        stop_processes([proc])
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    options = {"profile": args.profile}
    levels = [1, 32] if args.quick else [1, 32, 64, 128]
    raw: dict[int, dict[str, Any]] = {}
    for streams in levels:
        raw[streams] = await raw_level(options, streams, args.max_tokens, args.duration)
        print(f"  {'raw':14} {streams:4} streams: {raw[streams]}", flush=True)
    modes = {m: await replica_levels(m, options, levels, args.max_tokens, args.duration)
             for m in ("in-process", "engine-process")}  # fmt: skip
    ratios = {
        m: {c: round(cells[c]["tokens_per_s"] / raw[c]["tokens_per_s"], 3) for c in levels}
        for m, cells in modes.items()
    }
    ttft_x = {
        m: {c: round(cells[c]["ttft_p99_ms"] / max(raw[c]["ttft_p99_ms"], 1e-3), 2) for c in levels}
        for m, cells in modes.items()
    }
    costs = SimCosts.from_options(options)
    return {
        "machine": machine_info(),
        "profile": args.profile,
        "costs": costs.__dict__,
        "max_tokens": args.max_tokens,
        "duration_s": args.duration,
        "raw": raw,
        "replica": modes,
        "ratio_to_raw": ratios,
        "ttft_p99_vs_raw": ttft_x,
        "targets": {
            "ratio_at_32_and_64": {
                m: all(r.get(c, 1.0) >= 0.85 for c in (32, 64)) for m, r in ratios.items()
            },
            "ttft_p99_at_32_under_2x_raw": {m: t[32] < 2.0 for m, t in ttft_x.items()},
        },
    }


def main() -> None:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="h100-exllamav3")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "engine-process.json")
    args = p.parse_args()
    if args.quick:
        args.duration = min(args.duration, 2.0)
    report = asyncio.run(run(args))
    print("ratio to raw:", report["ratio_to_raw"])
    print("TTFT p99 vs raw:", report["ttft_p99_vs_raw"])
    print("targets:", report["targets"])
    write_json(args.out, report)


if __name__ == "__main__":
    main()
