"""Helpers shared by the benchmarks: raw CTranslate2 timing, server processes, streamed requests.

Each benchmark script puts the repository root on ``sys.path`` and imports this module as
``benchmarks._common``, so ``python benchmarks/<name>.py`` works from the repository root and
mypy (which sees ``benchmarks/`` as a namespace package) checks the imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import ctranslate2
import grpc
import psutil
from tokenizers import Tokenizer

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.client import _sweep, local

PROMPT = "Request {index:02d}: write a short story about a lighthouse keeper."


# -- numbers and machine ------------------------------------------------------------------------

percentile = _sweep.percentile  # one definition for the benchmarks and `meshllm bench`


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


def prompt_ids(model_dir: Path, texts: Sequence[str]) -> list[list[int]]:
    """Token ids as the replica makes them (engines that take ids: ExLlamaV3)."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [list(tokenizer.encode(t, add_special_tokens=True).ids) for t in texts]


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def print_targets(met: dict[str, Any]) -> None:
    print()
    for name, t in met.items():
        verdict = "met" if t["met"] else "NOT met"
        print(f"target {name} {t['target']}: {t['value']:.2f} -> {verdict}")
        if "note" in t:
            print(f"  ({t['note']})")


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


def raw_configs(cores: int, device: str = "cpu") -> list[RawConfig]:
    """The replica's own layout (same formula as CTranslate2Engine) and others: on the CPU,
    all cores in one batch and one core; on CUDA, one stream instead of the replica's two."""
    if device != "cpu":
        return [RawConfig("replica", 2, 1), RawConfig("one-stream", 1, 1)]
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
        "max_length": max_tokens,
        "include_prompt_in_result": False,
        "beam_size": 1,
        "sampling_topk": 1,
        "sampling_topp": 1.0,
        "repetition_penalty": 1.0,
        "max_batch_size": split,
    }
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
    generator: Any,
    prompts: list[list[str]],
    max_tokens: int,
    seconds: float,
    *,
    split: int,
    timed: bool,
) -> list[RawRun]:
    """At least three calls and at least ``seconds`` of generation."""
    runs: list[RawRun] = []
    while len(runs) < 3 or sum(r.wall_s for r in runs) < seconds:
        runs.append(generate_once(generator, prompts, max_tokens, split, timed))
    return runs


def rate(runs: Sequence[RawRun]) -> float:
    return sum(r.tokens for r in runs) / sum(r.wall_s for r in runs)


def measure_raw_cell(
    generator: Any,
    config: RawConfig,
    prompts: list[list[str]],
    max_tokens: int,
    seconds: float,
    *,
    callback: bool = True,
) -> RawCell:
    """Tokens/s without a callback, then (``callback``) with one, which also gives TTFT; the
    callback figures are 0.0 when that series is not run."""
    split = -(-len(prompts) // config.inter_threads)  # ceil: one sub-batch per worker
    generate_once(generator, prompts, max_tokens, split, timed=False)  # warm-up
    plain = repeat_runs(generator, prompts, max_tokens, seconds, split=split, timed=False)
    timed = (
        repeat_runs(generator, prompts, max_tokens, seconds, split=split, timed=True)
        if callback
        else []
    )
    firsts = [t * 1e3 for r in timed for t in r.first_token_s]
    return RawCell(
        config=config.label,
        inter_threads=config.inter_threads,
        intra_threads=config.intra_threads,
        batch_size=len(prompts),
        runs=len(plain),
        tokens_per_s=rate(plain),
        tokens_per_s_with_callback=rate(timed) if timed else 0.0,
        ttft_p50_ms=percentile(firsts, 0.5),
        ttft_p99_ms=percentile(firsts, 0.99),
    )


def measure_raw(
    model_dir: Path,
    prompts: list[list[str]],
    sizes: Sequence[int],
    max_tokens: int,
    seconds: float,
    *,
    callback: bool = True,
    device: str = "cpu",
    compute_type: str = "",
) -> list[RawCell]:
    """Every layout of :func:`raw_configs` at every batch size; ``seconds`` per cell and series."""
    cells: list[RawCell] = []
    kind, _, index = device.partition(":")
    for config in raw_configs(os.cpu_count() or 1, device):
        generator = ctranslate2.Generator(
            str(model_dir),
            device=kind,
            device_index=int(index or 0),
            compute_type=compute_type or "default",
            inter_threads=config.inter_threads,
            intra_threads=config.intra_threads,
            max_queued_batches=-1,
        )
        try:
            for size in sizes:
                cell = measure_raw_cell(
                    generator, config, prompts[:size], max_tokens, seconds, callback=callback
                )
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


# -- server processes ---------------------------------------------------------------------------

Process = subprocess.Popen[bytes]


def replica_args(port: int, model: str, *extra: str) -> list[str]:
    """``python -m meshllm.replica`` on loopback with ``model`` loaded at start."""
    return [
        sys.executable,
        "-m",
        "meshllm.replica",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        model,
        "--log-level",
        "WARNING",
        *extra,
    ]


def router_args(
    port: int, replica_ports: Sequence[int], *extra: str, tenants_file: str = ""
) -> list[str]:
    """``python -m meshllm.router`` on loopback in front of the replicas on ``replica_ports``;
    without API keys unless ``tenants_file`` is given."""
    replicas = [a for p in replica_ports for a in ("--replica", f"127.0.0.1:{p}")]
    auth = ["--tenants-file", tenants_file] if tenants_file else ["--no-auth"]
    return [
        sys.executable,
        "-m",
        "meshllm.router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *replicas,
        *auth,
        "--log-level",
        "WARNING",
        *extra,
    ]


def start_process(args: Sequence[str]) -> Process:
    return subprocess.Popen(list(args))


def stop_processes(procs: Sequence[Process], timeout_s: float = 40.0) -> None:
    """SIGTERM to all (they drain in parallel), then SIGKILL to stragglers (as ``meshllm up``)."""
    local.stop_processes(procs, timeout_s)


def cpu_seconds(procs: Mapping[str, Process]) -> dict[str, float]:
    """User + system CPU seconds used so far by each process, and by this one as ``client``."""
    out: dict[str, float] = {}
    for name, proc in procs.items():
        try:
            times = psutil.Process(proc.pid).cpu_times()
            out[name] = times.user + times.system
        except psutil.Error:
            out[name] = 0.0
    out["client"] = time.process_time()
    return out


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks stop the child processes."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


async def wait_ready(
    stub: Any, procs: Sequence[Process], model: str, replicas: int = 0, timeout_s: float = 120.0
) -> None:
    """Poll ListModels until ``model`` is listed (with ``replicas`` ready replicas, if given)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with status {proc.returncode}")
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await stub.ListModels(gen.ListModelsRequest(), timeout=1.0)
            if any(m.id == model and m.ready_replicas >= replicas for m in reply.models):
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{model!r} not listed with {replicas} replicas within {timeout_s:.0f}s")


# -- streamed requests --------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One ``GenerateStream`` call, timed at the client."""

    ttft_s: float
    latency_s: float
    tokens: int
    chunks: int
    server_ttft_ms: float
    server_queue_ms: float
    replica: str


async def one_request(
    stub: Any, request: gen.GenerateRequest, start: float | None = None
) -> RequestRecord:
    """Stream one reply; times count from ``start`` (default: now, when the call is made)."""
    start = time.perf_counter() if start is None else start
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
        ttft_s=(first or end) - start,
        latency_s=end - start,
        tokens=last.usage.completion_tokens,
        chunks=chunks,
        server_ttft_ms=last.timing.time_to_first_token_ms,
        server_queue_ms=last.timing.queue_wait_ms,
        replica=last.timing.replica,
    )


async def client_loop(stub: Any, request: gen.GenerateRequest, end: float) -> list[RequestRecord]:
    """A closed-loop client: the next request goes out when the previous one has finished."""
    records: list[RequestRecord] = []
    while time.perf_counter() < end:
        records.append(await one_request(stub, request))
    return records


async def closed_loop(
    stub: Any, requests: Sequence[gen.GenerateRequest], seconds: float
) -> tuple[list[RequestRecord], float]:
    """One closed-loop client per request for ``seconds``; in-flight requests finish."""
    start = time.perf_counter()
    end = start + seconds
    per_client = await asyncio.gather(*(client_loop(stub, r, end) for r in requests))
    return [rec for recs in per_client for rec in recs], time.perf_counter() - start
