"""Replica benchmark: the raw engine (CTranslate2 by default) against the same model over gRPC.

What is measured, in one run, on the built-in ``bench`` model (int8, d_model 256, 4 layers,
byte-level vocabulary; random weights, so the text is noise but the work is real):

1. RAW: ``Generator.generate_batch`` in this process, greedy (``sampling_topk=1``), prompt not
   in the result, ``max_length`` = ``--max-tokens``, for batch sizes 1, 8 and 32. Several
   thread layouts are tried and the best one is the reference:

   - ``replica`` : the layout ``CTranslate2Engine`` picks on this machine (inter_threads
     workers, intra_threads each), the batch split evenly over the workers;
   - ``all-cores``: one worker with ``intra_threads = os.cpu_count()``, one batch;
   - ``one-core`` : one worker, one thread.

   tokens/s = generated tokens / wall time of the call, without a callback. A second series
   runs with a minimal per-token callback (as the replica does) and gives the raw time to first
   token: call start to the first callback of each item.

2. GRPC: a replica in a separate process (``python -m meshllm.replica --model bench``) and,
   in this process, C closed-loop clients (C = 1, 8, 32) on one grpc.aio channel, each calling
   ``GenerateStream`` back to back with temperature 0 and max_tokens N, for ``--duration``
   seconds after a warm-up. Per request: time to first token (send to the first chunk with
   token ids, client side), completion tokens (final chunk's usage), chunks per request.

3. The ratio gRPC tokens/s / best raw tokens/s at the same concurrency / batch size, and the
   issue's targets: ratio >= 0.85 and TTFT p50 < 100 ms at 32.

Run it from the repository root (``make bench`` does the same)::

    python benchmarks/replica.py                # full run, about two minutes
    python benchmarks/replica.py --quick        # smoke run, about 30 seconds

On a GPU, for both engines on the same weights (``bench-llama``: a 4-layer random Llama, the
FP16 Hugging Face folder for ExLlamaV3 and its CTranslate2 twin; raw = the engine's own loop)::

    python benchmarks/replica.py --engine ctranslate2 --device cuda:0   # compute type float16
    python benchmarks/replica.py --engine exllamav3 --device cuda:0     # needs [exllamav3]

Figures are printed and written as JSON to ``benchmarks/results/replica.json`` (``--out``;
``replica-<engine>-<device>.json`` off the CPU default).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks._common as a script

from benchmarks._common import (
    RawCell,
    RequestRecord,
    best_raw,
    closed_loop,
    exit_on_sigterm,
    machine_info,
    measure_raw,
    percentile,
    print_targets,
    prompt_ids,
    prompt_texts,
    prompt_tokens,
    replica_args,
    start_process,
    stop_processes,
    wait_ready,
    write_json,
)
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client.local import free_port
from meshllm.replica.models.tiny import BENCH, ensure_model
from meshllm.replica.models.tiny_llama import BENCH_LLAMA, ensure_ct2_twin, ensure_tiny_llama

LEVELS = (1, 8, 32)
MODEL_ID = "bench"
TARGET_RATIO = 0.85
TARGET_TTFT_P50_MS = 100.0
DEFAULT_OUT = Path("benchmarks/results/replica.json")


@dataclass(frozen=True)
class Options:
    max_tokens: int
    duration_s: float
    warmup_s: float
    raw_seconds: float
    out: Path
    quick: bool
    engine: str
    device: str
    compute_type: str
    cache_tokens: int
    replica_args: tuple[str, ...] = ()
    """Extra ``meshllm-replica`` flags for the gRPC half, e.g. ``--inter-threads 1``."""


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (128)")
    p.add_argument("--duration", type=float, default=None, help="seconds per gRPC level (10)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per level (2)")
    p.add_argument("--raw-seconds", type=float, default=None, help="seconds per raw cell (2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file ({DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s levels, 64 tokens")
    p.add_argument("--engine", default="ctranslate2", choices=["ctranslate2", "exllamav3"])
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (exllamav3: cuda:N only)")
    p.add_argument(
        "--compute-type",
        default=None,
        help="CTranslate2 compute type (default: the model's on cpu, float16 on cuda)",
    )
    p.add_argument(
        "--cache-tokens",
        type=int,
        default=65536,
        help="exllamav3: KV cache size in tokens, raw and replica alike (65536)",
    )
    p.add_argument(
        "--replica-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra meshllm-replica flag for the gRPC half, repeatable "
        "(e.g. --replica-arg=--inter-threads --replica-arg=1)",
    )
    a = p.parse_args(argv)
    if a.engine == "exllamav3" and not a.device.startswith("cuda"):
        p.error("--engine exllamav3 needs --device cuda:N")
    if a.out == DEFAULT_OUT and (a.engine, a.device) != ("ctranslate2", "cpu"):
        a.out = DEFAULT_OUT.with_name(f"replica-{a.engine}-{a.device.replace(':', '')}.json")
    compute_type = a.compute_type
    if compute_type is None:
        compute_type = "float16" if a.engine == "ctranslate2" and a.device != "cpu" else ""

    def pick(value: float | None, full: float, quick: float) -> float:
        return value if value is not None else (quick if a.quick else full)

    return Options(
        max_tokens=int(pick(a.max_tokens, 128, 64)),
        duration_s=pick(a.duration, 10.0, 2.0),
        warmup_s=pick(a.warmup, 2.0, 0.5),
        raw_seconds=pick(a.raw_seconds, 2.0, 0.3),
        out=a.out,
        quick=a.quick,
        engine=a.engine,
        device=a.device,
        compute_type=compute_type,
        cache_tokens=a.cache_tokens,
        replica_args=tuple(a.replica_arg),
    )


# -- gRPC replica -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcLevel:
    concurrency: int
    requests: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    server_ttft_p50_ms: float
    server_queue_p50_ms: float
    latency_p50_ms: float
    chunks_per_request: float
    tokens_per_chunk: float


async def run_level(
    stub: Any, texts: Sequence[str], concurrency: int, seconds: float, max_tokens: int
) -> tuple[list[RequestRecord], float]:
    """Run ``concurrency`` clients for ``seconds``; in-flight requests are allowed to finish."""
    requests = [
        gen.GenerateRequest(
            model=MODEL_ID, prompt=texts[i % len(texts)], temperature=0.0, max_tokens=max_tokens
        )
        for i in range(concurrency)
    ]
    return await closed_loop(stub, requests, seconds)


def summarize_level(concurrency: int, records: Sequence[RequestRecord], wall: float) -> GrpcLevel:
    tokens = sum(r.tokens for r in records)
    chunks = sum(r.chunks for r in records)
    ttft = [r.ttft_s * 1e3 for r in records]
    return GrpcLevel(
        concurrency=concurrency,
        requests=len(records),
        wall_s=wall,
        tokens=tokens,
        tokens_per_s=tokens / wall,
        requests_per_s=len(records) / wall,
        ttft_p50_ms=percentile(ttft, 0.5),
        ttft_p99_ms=percentile(ttft, 0.99),
        server_ttft_p50_ms=percentile([r.server_ttft_ms for r in records], 0.5),
        server_queue_p50_ms=percentile([r.server_queue_ms for r in records], 0.5),
        latency_p50_ms=percentile([r.latency_s * 1e3 for r in records], 0.5),
        chunks_per_request=chunks / max(1, len(records)),
        tokens_per_chunk=tokens / max(1, chunks),
    )


async def measure_levels(stub: Any, texts: Sequence[str], opts: Options) -> list[GrpcLevel]:
    levels: list[GrpcLevel] = []
    for c in LEVELS:
        await run_level(stub, texts, c, opts.warmup_s, opts.max_tokens)
        records, wall = await run_level(stub, texts, c, opts.duration_s, opts.max_tokens)
        level = summarize_level(c, records, wall)
        print(
            f"  grpc concurrency {c:>2}: {level.tokens_per_s:8.0f} tok/s, "
            f"TTFT p50 {level.ttft_p50_ms:.1f} ms"
        )
        levels.append(level)
    return levels


def model_dir_for(opts: Options) -> Path:
    """The CPU default keeps the int8 ``bench`` model; on a GPU both engines run bench-llama."""
    if opts.engine == "exllamav3":
        return ensure_tiny_llama(BENCH_LLAMA)
    if opts.device == "cpu":
        return ensure_model(BENCH)
    return ensure_ct2_twin(BENCH_LLAMA)


def model_label(opts: Options) -> str:
    return BENCH.name if (opts.engine, opts.device) == ("ctranslate2", "cpu") else BENCH_LLAMA.name


def engine_args(opts: Options, model_dir: Path) -> list[str]:
    """The replica's flags for this run (none extra for the CPU default)."""
    if (opts.engine, opts.device) == ("ctranslate2", "cpu"):
        return list(opts.replica_args)
    args = ["--engine", opts.engine, "--device", opts.device, "--model-id", MODEL_ID]
    if opts.compute_type:
        args += ["--compute-type", opts.compute_type]
    if opts.engine == "exllamav3":
        args += [
            "--option",
            f"cache_size={opts.cache_tokens}",
            "--max-batch-size",
            str(max(LEVELS)),
        ]
    return args + list(opts.replica_args)


async def measure_grpc(texts: Sequence[str], opts: Options, model_dir: Path) -> list[GrpcLevel]:
    port = free_port()
    model = MODEL_ID if (opts.engine, opts.device) == ("ctranslate2", "cpu") else str(model_dir)
    proc = start_process(replica_args(port, model, *engine_args(opts, model_dir)))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gen_grpc.GenerationStub(channel)
            await wait_ready(stub, [proc], MODEL_ID)
            return await measure_levels(stub, texts, opts)
    finally:
        stop_processes([proc])


def measure_engine_raw(model_dir: Path, texts: Sequence[str], opts: Options) -> list[RawCell]:
    if opts.engine == "exllamav3":
        from benchmarks._exllamav3 import measure_raw_exllamav3

        index = int(opts.device.partition(":")[2] or 0)
        return measure_raw_exllamav3(
            model_dir,
            prompt_ids(model_dir, texts),
            LEVELS,
            opts.max_tokens,
            opts.raw_seconds,
            device_index=index,
            cache_tokens=opts.cache_tokens,
        )
    return measure_raw(
        model_dir,
        prompt_tokens(model_dir, texts),
        LEVELS,
        opts.max_tokens,
        opts.raw_seconds,
        device=opts.device,
        compute_type=opts.compute_type,
    )


def gpu_name(device: str) -> str:
    """The GPU model for the report (NVML, when installed), "" on the CPU."""
    if not device.startswith("cuda"):
        return ""
    try:
        import pynvml

        pynvml.nvmlInit()
        index = int(device.partition(":")[2] or 0)
        return str(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index)))
    except Exception as e:  # no NVML: say so rather than guess
        return f"unknown ({type(e).__name__})"


# -- comparison and report ----------------------------------------------------------------------


def comparison(
    raw: dict[int, RawCell], replica_raw: dict[int, RawCell], levels: Sequence[GrpcLevel]
) -> dict[str, dict[str, float]]:
    return {
        str(lv.concurrency): {
            "vs_best_raw": lv.tokens_per_s / raw[lv.concurrency].tokens_per_s,
            "vs_raw_replica_threads": lv.tokens_per_s / replica_raw[lv.concurrency].tokens_per_s,
        }
        for lv in levels
    }


def targets(ratios: dict[str, dict[str, float]], levels: Sequence[GrpcLevel]) -> dict[str, Any]:
    top = max(LEVELS)
    ratio = ratios[str(top)]["vs_best_raw"]
    ttft = next(lv.ttft_p50_ms for lv in levels if lv.concurrency == top)
    return {
        f"ratio_at_{top}": {
            "target": f">= {TARGET_RATIO}",
            "value": ratio,
            "met": ratio >= TARGET_RATIO,
        },
        f"ttft_p50_ms_at_{top}": {
            "target": f"< {TARGET_TTFT_P50_MS}",
            "value": ttft,
            "met": ttft < TARGET_TTFT_P50_MS,
        },
    }


def print_raw(cells: Sequence[RawCell], opts: Options, model: str) -> None:
    print(
        f"\nRaw {opts.engine} on {opts.device}, {model} model, greedy, {opts.max_tokens} tokens per item"
    )
    print(
        f"{'config':<10} {'threads':>8} {'batch':>5} {'tok/s':>8} {'tok/s cb':>9} "
        f"{'TTFT p50':>9} {'p99':>7}"
    )
    for c in cells:
        threads = f"{c.inter_threads}x{c.intra_threads}"
        print(
            f"{c.config:<10} {threads:>8} {c.batch_size:>5} {c.tokens_per_s:>8.0f} "
            f"{c.tokens_per_s_with_callback:>9.0f} {c.ttft_p50_ms:>7.1f}ms "
            f"{c.ttft_p99_ms:>5.1f}ms"
        )


def print_grpc(
    levels: Sequence[GrpcLevel], raw: dict[int, RawCell], ratios: dict[str, dict[str, float]]
) -> None:
    print("\ngRPC replica (separate process), closed-loop GenerateStream clients")
    print(
        f"{'conc':>4} {'tok/s':>8} {'req/s':>7} {'TTFT p50':>9} {'p99':>8} {'chunks/req':>10} "
        f"{'raw tok/s':>9} {'ratio':>6}"
    )
    for lv in levels:
        ratio = ratios[str(lv.concurrency)]["vs_best_raw"]
        print(
            f"{lv.concurrency:>4} {lv.tokens_per_s:>8.0f} {lv.requests_per_s:>7.1f} "
            f"{lv.ttft_p50_ms:>7.1f}ms {lv.ttft_p99_ms:>6.1f}ms {lv.chunks_per_request:>10.1f} "
            f"{raw[lv.concurrency].tokens_per_s:>9.0f} {ratio:>6.2f}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    exit_on_sigterm()
    model_dir = model_dir_for(opts)
    texts = prompt_texts(max(LEVELS))
    print(f"raw {opts.engine} on {opts.device} ({opts.raw_seconds:g} s per cell) ...")
    cells = measure_engine_raw(model_dir, texts, opts)
    print(f"gRPC replica ({opts.duration_s:g} s per level after {opts.warmup_s:g} s warm-up) ...")
    levels = asyncio.run(measure_grpc(texts, opts, model_dir))
    raw = best_raw(cells)
    # exllamav3 has one layout of its own: its best is the replica's
    replica_raw = best_raw([c for c in cells if c.config == "replica"]) or raw
    ratios = comparison(raw, replica_raw, levels)
    met = targets(ratios, levels)
    print_raw(cells, opts, model_label(opts))
    print_grpc(levels, raw, ratios)
    print_targets(met)
    write_json(
        opts.out,
        {
            "machine": machine_info(),
            "settings": {**asdict(opts), "out": str(opts.out)},
            "model": {
                "name": model_label(opts),
                "cache_key": model_dir.name,
                "dir": str(model_dir),
            },
            "gpu": gpu_name(opts.device),
            "raw": [asdict(c) for c in cells],
            "raw_best": {str(k): asdict(v) for k, v in raw.items()},
            "grpc": [asdict(lv) for lv in levels],
            "ratios": ratios,
            "targets": met,
        },
    )


if __name__ == "__main__":
    main()
