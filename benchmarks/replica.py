"""Replica benchmark: raw CTranslate2 against the same model served over gRPC.

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

Figures are printed and written as JSON to ``benchmarks/results/replica.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ctranslate2
import grpc
from tokenizers import Tokenizer

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.replica.models.tiny import BENCH, ensure_model

LEVELS = (1, 8, 32)
MODEL_ID = "bench"
TARGET_RATIO = 0.85
TARGET_TTFT_P50_MS = 100.0
DEFAULT_OUT = Path("benchmarks/results/replica.json")
PROMPT = "Request {index:02d}: write a short story about a lighthouse keeper."


@dataclass(frozen=True)
class Options:
    max_tokens: int
    duration_s: float
    warmup_s: float
    raw_seconds: float
    out: Path
    quick: bool


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (128)")
    p.add_argument("--duration", type=float, default=None, help="seconds per gRPC level (10)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per level (2)")
    p.add_argument("--raw-seconds", type=float, default=None, help="seconds per raw cell (2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file ({DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s levels, 64 tokens")
    a = p.parse_args(argv)

    def pick(value: float | None, full: float, quick: float) -> float:
        return value if value is not None else (quick if a.quick else full)

    return Options(
        max_tokens=int(pick(a.max_tokens, 128, 64)), duration_s=pick(a.duration, 10.0, 2.0),
        warmup_s=pick(a.warmup, 2.0, 0.5), raw_seconds=pick(a.raw_seconds, 2.0, 0.3),
        out=a.out, quick=a.quick,
    )  # fmt: skip


# -- helpers ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 1]; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "cuda_devices": ctranslate2.get_cuda_device_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ctranslate2": ctranslate2.__version__,
        "grpcio": grpc.__version__,
    }


def prompt_texts(count: int) -> list[str]:
    """Distinct prompts of equal token length (no padding differences inside a batch)."""
    return [PROMPT.format(index=i) for i in range(count)]


def prompt_tokens(model_dir: Path, texts: Sequence[str]) -> list[list[str]]:
    """Token strings as the replica makes them: tokenizer.json encoding, BOS included."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [list(tokenizer.encode(t, add_special_tokens=True).tokens) for t in texts]


# -- raw CTranslate2 ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RawConfig:
    label: str
    inter_threads: int
    intra_threads: int


@dataclass(frozen=True)
class RawRun:
    tokens: int
    wall_s: float
    first_token_s: tuple[float, ...]


@dataclass(frozen=True)
class RawCell:
    config: str
    inter_threads: int
    intra_threads: int
    batch_size: int
    runs: int
    tokens_per_s: float
    tokens_per_s_with_callback: float
    ttft_p50_ms: float
    ttft_p99_ms: float


def raw_configs(cores: int) -> list[RawConfig]:
    """The replica's own layout (same formula as CTranslate2Engine on CPU) and two others."""
    workers = min(2, cores)
    configs = [
        RawConfig("replica", workers, max(1, cores // workers)),
        RawConfig("all-cores", 1, cores),
        RawConfig("one-core", 1, 1),
    ]
    seen: set[tuple[int, int]] = set()
    unique = []
    for c in configs:
        if (c.inter_threads, c.intra_threads) not in seen:
            seen.add((c.inter_threads, c.intra_threads))
            unique.append(c)
    return unique


def generate_once(
    generator: Any, prompts: list[list[str]], max_tokens: int, split: int, timed: bool
) -> RawRun:
    """One generate_batch call; ``split`` is max_batch_size (spreads the batch over workers)."""
    first: dict[int, float] = {}
    kwargs: dict[str, Any] = {
        "max_length": max_tokens, "include_prompt_in_result": False, "beam_size": 1,
        "sampling_topk": 1, "sampling_topp": 1.0, "repetition_penalty": 1.0,
        "max_batch_size": split,
    }  # fmt: skip
    if timed:

        def on_step(step: Any) -> bool:
            if step.batch_id not in first:
                first[step.batch_id] = time.perf_counter()
            return False

        kwargs["callback"] = on_step
    start = time.perf_counter()
    results = generator.generate_batch(prompts, **kwargs)
    wall = time.perf_counter() - start
    tokens = sum(len(r.sequences_ids[0]) for r in results)
    return RawRun(tokens, wall, tuple(t - start for t in first.values()))


def repeat_runs(
    generator: Any, prompts: list[list[str]], opts: Options, split: int, timed: bool
) -> list[RawRun]:
    """At least three calls and at least ``opts.raw_seconds`` of generation."""
    runs: list[RawRun] = []
    while len(runs) < 3 or sum(r.wall_s for r in runs) < opts.raw_seconds:
        runs.append(generate_once(generator, prompts, opts.max_tokens, split, timed))
    return runs


def rate(runs: Sequence[RawRun]) -> float:
    return sum(r.tokens for r in runs) / sum(r.wall_s for r in runs)


def measure_raw_cell(
    generator: Any, config: RawConfig, prompts: list[list[str]], opts: Options
) -> RawCell:
    split = -(-len(prompts) // config.inter_threads)  # ceil: one sub-batch per worker
    generate_once(generator, prompts, opts.max_tokens, split, timed=False)  # warm-up
    plain = repeat_runs(generator, prompts, opts, split, timed=False)
    timed = repeat_runs(generator, prompts, opts, split, timed=True)
    firsts = [t * 1e3 for r in timed for t in r.first_token_s]
    return RawCell(
        config=config.label, inter_threads=config.inter_threads,
        intra_threads=config.intra_threads, batch_size=len(prompts), runs=len(plain),
        tokens_per_s=rate(plain), tokens_per_s_with_callback=rate(timed),
        ttft_p50_ms=percentile(firsts, 0.5), ttft_p99_ms=percentile(firsts, 0.99),
    )  # fmt: skip


def measure_raw(model_dir: Path, prompts: list[list[str]], opts: Options) -> list[RawCell]:
    cells: list[RawCell] = []
    for config in raw_configs(os.cpu_count() or 1):
        generator = ctranslate2.Generator(
            str(model_dir), device="cpu", compute_type="default",
            inter_threads=config.inter_threads, intra_threads=config.intra_threads,
            max_queued_batches=-1,
        )  # fmt: skip
        try:
            for size in LEVELS:
                cell = measure_raw_cell(generator, config, prompts[:size], opts)
                print(f"  raw {config.label:>9} batch {size:>2}: {cell.tokens_per_s:8.0f} tok/s")
                cells.append(cell)
        finally:
            generator.unload_model()
            del generator
    return cells


def best_raw(cells: Sequence[RawCell]) -> dict[int, RawCell]:
    """The fastest configuration (no callback) for each batch size."""
    best: dict[int, RawCell] = {}
    for cell in cells:
        if cell.batch_size not in best or cell.tokens_per_s > best[cell.batch_size].tokens_per_s:
            best[cell.batch_size] = cell
    return best


# -- gRPC replica -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    ttft_s: float
    latency_s: float
    tokens: int
    chunks: int
    server_ttft_ms: float
    server_queue_ms: float


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_replica(port: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "meshllm.replica", "--host", "127.0.0.1", "--port", str(port),
            "--model", MODEL_ID, "--log-level", "WARNING"]  # fmt: skip
    return subprocess.Popen(args)


def stop_replica(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_ready(stub: Any, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    """Poll ListModels until the replica lists the model."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"replica exited with status {proc.returncode}")
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await stub.ListModels(gen.ListModelsRequest(), timeout=1.0)
            if any(m.id == MODEL_ID for m in reply.models):
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"replica did not list {MODEL_ID!r} within {timeout_s:.0f}s")


async def one_request(stub: Any, request: gen.GenerateRequest) -> RequestRecord:
    start = time.perf_counter()
    first: float | None = None
    chunks = 0
    last: gen.GenerateChunk | None = None
    async for chunk in stub.GenerateStream(request):
        chunks += 1
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        last = chunk
    end = time.perf_counter()
    if last is None:
        raise RuntimeError("GenerateStream ended without a chunk")
    return RequestRecord(
        ttft_s=(first or end) - start, latency_s=end - start,
        tokens=last.usage.completion_tokens, chunks=chunks,
        server_ttft_ms=last.timing.time_to_first_token_ms,
        server_queue_ms=last.timing.queue_wait_ms,
    )  # fmt: skip


async def client_loop(stub: Any, request: gen.GenerateRequest, end: float) -> list[RequestRecord]:
    """A closed-loop client: the next request goes out when the previous one has finished."""
    records: list[RequestRecord] = []
    while time.perf_counter() < end:
        records.append(await one_request(stub, request))
    return records


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
    start = time.perf_counter()
    end = start + seconds
    per_client = await asyncio.gather(*(client_loop(stub, r, end) for r in requests))
    return [rec for recs in per_client for rec in recs], time.perf_counter() - start


def summarize_level(concurrency: int, records: Sequence[RequestRecord], wall: float) -> GrpcLevel:
    tokens = sum(r.tokens for r in records)
    chunks = sum(r.chunks for r in records)
    ttft = [r.ttft_s * 1e3 for r in records]
    return GrpcLevel(
        concurrency=concurrency, requests=len(records), wall_s=wall, tokens=tokens,
        tokens_per_s=tokens / wall, requests_per_s=len(records) / wall,
        ttft_p50_ms=percentile(ttft, 0.5), ttft_p99_ms=percentile(ttft, 0.99),
        server_ttft_p50_ms=percentile([r.server_ttft_ms for r in records], 0.5),
        server_queue_p50_ms=percentile([r.server_queue_ms for r in records], 0.5),
        latency_p50_ms=percentile([r.latency_s * 1e3 for r in records], 0.5),
        chunks_per_request=chunks / max(1, len(records)),
        tokens_per_chunk=tokens / max(1, chunks),
    )  # fmt: skip


async def measure_levels(stub: Any, texts: Sequence[str], opts: Options) -> list[GrpcLevel]:
    levels: list[GrpcLevel] = []
    for c in LEVELS:
        await run_level(stub, texts, c, opts.warmup_s, opts.max_tokens)
        records, wall = await run_level(stub, texts, c, opts.duration_s, opts.max_tokens)
        level = summarize_level(c, records, wall)
        print(f"  grpc concurrency {c:>2}: {level.tokens_per_s:8.0f} tok/s, "
              f"TTFT p50 {level.ttft_p50_ms:.1f} ms")  # fmt: skip
        levels.append(level)
    return levels


async def measure_grpc(texts: Sequence[str], opts: Options) -> list[GrpcLevel]:
    port = free_port()
    proc = start_replica(port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gen_grpc.GenerationStub(channel)
            await wait_ready(stub, proc)
            return await measure_levels(stub, texts, opts)
    finally:
        stop_replica(proc)


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
        f"ratio_at_{top}": {"target": f">= {TARGET_RATIO}", "value": ratio,
                            "met": ratio >= TARGET_RATIO},
        f"ttft_p50_ms_at_{top}": {"target": f"< {TARGET_TTFT_P50_MS}", "value": ttft,
                                  "met": ttft < TARGET_TTFT_P50_MS},
    }  # fmt: skip


def print_raw(cells: Sequence[RawCell], opts: Options) -> None:
    print(f"\nRaw CTranslate2, bench model, greedy, {opts.max_tokens} tokens per item")
    print(f"{'config':<10} {'threads':>8} {'batch':>5} {'tok/s':>8} {'tok/s cb':>9} "
          f"{'TTFT p50':>9} {'p99':>7}")  # fmt: skip
    for c in cells:
        threads = f"{c.inter_threads}x{c.intra_threads}"
        print(f"{c.config:<10} {threads:>8} {c.batch_size:>5} {c.tokens_per_s:>8.0f} "
              f"{c.tokens_per_s_with_callback:>9.0f} {c.ttft_p50_ms:>7.1f}ms "
              f"{c.ttft_p99_ms:>5.1f}ms")  # fmt: skip


def print_grpc(
    levels: Sequence[GrpcLevel], raw: dict[int, RawCell], ratios: dict[str, dict[str, float]]
) -> None:
    print("\ngRPC replica (separate process), closed-loop GenerateStream clients")
    print(f"{'conc':>4} {'tok/s':>8} {'req/s':>7} {'TTFT p50':>9} {'p99':>8} {'chunks/req':>10} "
          f"{'raw tok/s':>9} {'ratio':>6}")  # fmt: skip
    for lv in levels:
        ratio = ratios[str(lv.concurrency)]["vs_best_raw"]
        print(f"{lv.concurrency:>4} {lv.tokens_per_s:>8.0f} {lv.requests_per_s:>7.1f} "
              f"{lv.ttft_p50_ms:>7.1f}ms {lv.ttft_p99_ms:>6.1f}ms {lv.chunks_per_request:>10.1f} "
              f"{raw[lv.concurrency].tokens_per_s:>9.0f} {ratio:>6.2f}")  # fmt: skip


def print_targets(met: dict[str, Any]) -> None:
    print()
    for name, t in met.items():
        verdict = "met" if t["met"] else "NOT met"
        print(f"target {name} {t['target']}: {t['value']:.2f} -> {verdict}")


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    model_dir = ensure_model(BENCH)
    texts = prompt_texts(max(LEVELS))
    print(f"raw CTranslate2 ({opts.raw_seconds:g} s per cell) ...")
    cells = measure_raw(model_dir, prompt_tokens(model_dir, texts), opts)
    print(f"gRPC replica ({opts.duration_s:g} s per level after {opts.warmup_s:g} s warm-up) ...")
    levels = asyncio.run(measure_grpc(texts, opts))
    raw = best_raw(cells)
    replica_raw = best_raw([c for c in cells if c.config == "replica"])
    ratios = comparison(raw, replica_raw, levels)
    met = targets(ratios, levels)
    print_raw(cells, opts)
    print_grpc(levels, raw, ratios)
    print_targets(met)
    write_json(opts.out, {
        "machine": machine_info(), "settings": {**asdict(opts), "out": str(opts.out)},
        "model": {"name": BENCH.name, "cache_key": BENCH.cache_key, "dir": str(model_dir)},
        "raw": [asdict(c) for c in cells],
        "raw_best": {str(k): asdict(v) for k, v in raw.items()},
        "grpc": [asdict(lv) for lv in levels], "ratios": ratios, "targets": met,
    })  # fmt: skip


if __name__ == "__main__":
    main()
