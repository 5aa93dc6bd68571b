"""Raw ExLlamaV3: its own ``Generator.iterate()`` loop in this process, the baseline that the
exllamav3 replica is compared with (``benchmarks/replica.py --engine exllamav3``; needs CUDA).

Per batch size B: B greedy jobs (``ComboSampler(temperature=0)``, no stop conditions, exactly
``max_tokens`` each) are enqueued at once and iterated to the end; tokens/s = generated tokens /
wall time, time to first token = enqueue to the job's first streamed token. Repeated until at
least three runs and ``seconds`` of generation, after one warm-up run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import RawCell, percentile


def load_generator(model_dir: Path, device_index: int, cache_tokens: int, max_jobs: int) -> Any:
    import torch
    from exllamav3 import Cache, Config, Generator, Model, Tokenizer

    torch.cuda.set_device(device_index)
    config = Config.from_directory(str(model_dir))
    model = Model.from_config(config)
    cache = Cache(model, max_num_tokens=cache_tokens)
    model.load(device=torch.device("cuda", device_index))
    return Generator(
        model=model, cache=cache, tokenizer=Tokenizer.from_config(config), max_batch_size=max_jobs
    )


def run_once(
    generator: Any, prompts: Sequence[Sequence[int]], max_tokens: int
) -> tuple[int, float, list[float]]:
    """(tokens, wall seconds, first-token seconds per job) for one batch run to completion."""
    import torch
    from exllamav3 import ComboSampler, Job

    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        generator.enqueue(
            Job(
                input_ids=torch.tensor([list(ids)], dtype=torch.long),
                max_new_tokens=max_tokens,
                identifier=i,
                sampler=ComboSampler(temperature=0.0),
            )
        )
    first: dict[int, float] = {}
    tokens = 0
    while generator.num_remaining_jobs():
        for r in generator.iterate():
            ids = r.get("token_ids")
            if ids is not None and ids.numel():
                tokens += int(ids.numel())
                first.setdefault(r["identifier"], time.perf_counter() - start)
    return tokens, time.perf_counter() - start, list(first.values())


def measure_raw_exllamav3(
    model_dir: Path,
    prompts: Sequence[Sequence[int]],
    sizes: Sequence[int],
    max_tokens: int,
    seconds: float,
    *,
    device_index: int,
    cache_tokens: int,
) -> list[RawCell]:
    generator = load_generator(model_dir, device_index, cache_tokens, max(sizes))
    cells: list[RawCell] = []
    try:
        for size in sizes:
            batch = prompts[:size]
            run_once(generator, batch, max_tokens)  # warm-up
            runs: list[tuple[int, float, list[float]]] = []
            while len(runs) < 3 or sum(r[1] for r in runs) < seconds:
                runs.append(run_once(generator, batch, max_tokens))
            rate = sum(r[0] for r in runs) / sum(r[1] for r in runs)
            firsts = [t * 1e3 for r in runs for t in r[2]]
            cells.append(
                RawCell(
                    config="generator",
                    inter_threads=1,
                    intra_threads=1,
                    batch_size=size,
                    runs=len(runs),
                    tokens_per_s=rate,
                    tokens_per_s_with_callback=rate,
                    ttft_p50_ms=percentile(firsts, 0.5),
                    ttft_p99_ms=percentile(firsts, 0.99),
                )
            )
            print(f"  raw exllamav3 batch {size:>2}: {rate:8.0f} tok/s")
    finally:
        generator.model.unload()
    return cells
