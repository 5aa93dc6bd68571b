"""``meshllm bench``: sweep concurrency against a router or replica and recommend a level.

Each level runs ``c`` closed-loop streams (the next request leaves when the previous one
ended) for ``--duration`` seconds after a short warm-up; latency is send to last chunk and time
to first token is send to the first chunk with tokens, both at the client. The recommended
level is the lowest that reaches 95 % of the best tokens/s with no errors and, with
``--max-p99-ms``, a p99 latency within that limit. Figures with failed requests in them are not
those of a healthy mesh: the sweep then exits 1 and says what failed, and a level where no
request succeeded (an unknown model, say) ends the sweep there.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from meshllm.api.errors import MeshError
from meshllm.client._async import AsyncClient
from meshllm.client._options import RequestFields
from meshllm.client._sweep import Level, Sample, recommend, summarize


@dataclass(frozen=True, kw_only=True)
class BenchJob:
    model: str
    levels: tuple[int, ...]
    duration_s: float = 5.0
    warmup_s: float = 1.0
    prompt: str = "Write a short story about a lighthouse keeper."
    fields: RequestFields = field(default_factory=RequestFields)
    """What every request asks (max_tokens, sampling)."""
    max_p99_ms: float | None = None


def levels_up_to(maximum: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``maximum`` (included even when not a power of two)."""
    out, c = [], 1
    while c < maximum:
        out.append(c)
        c *= 2
    return (*out, maximum)


async def _one(client: AsyncClient, job: BenchJob, index: int) -> Sample:
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    async for chunk in client.stream_with(
        f"{job.prompt} ({index})", model=job.model, fields=job.fields
    ):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        tokens += len(chunk.token_ids)
    end = time.perf_counter()
    return Sample(latency_s=end - start, ttft_s=(first or end) - start, tokens=tokens)


async def _level(
    client: AsyncClient, job: BenchJob, c: int, seconds: float, failures: Counter[str]
) -> Level:
    """One level; each failed request is counted in ``failures`` by what it was."""
    samples: list[Sample] = []
    errors = 0
    start = time.perf_counter()
    end = start + seconds

    async def worker(w: int) -> None:
        nonlocal errors
        n = 0
        while time.perf_counter() < end:
            try:
                samples.append(await _one(client, job, w * 1_000_000 + n))
            except MeshError as e:
                errors += 1
                failures[f"{e.code.name}: {e.message}"] += 1
                await asyncio.sleep(0.05)
            n += 1

    await asyncio.gather(*(worker(w) for w in range(c)))
    return summarize(c, samples, errors, time.perf_counter() - start)


async def run_bench(client: AsyncClient, job: BenchJob) -> dict[str, Any]:
    """Sweep the levels; the report (also ``--json``'s output)."""
    levels: list[Level] = []
    failures: Counter[str] = Counter()
    for c in job.levels:
        if job.warmup_s > 0:
            await _level(client, job, c, job.warmup_s, failures)
        levels.append(await _level(client, job, c, job.duration_s, failures))
        print(_line(levels[-1]), file=sys.stderr, flush=True)
        if levels[-1].requests == 0 and failures:
            print("meshllm bench: no request succeeded; stopping the sweep", file=sys.stderr)
            break
    best = recommend(levels, max_p99_ms=job.max_p99_ms)
    return {
        "target": client.target,
        "model": job.model,
        "duration_s": job.duration_s,
        "fields": job.fields.given(),
        "max_p99_ms": job.max_p99_ms,
        "levels": [asdict(lv) for lv in levels],
        "recommended_concurrency": best.concurrency if best else None,
        "failures": dict(failures.most_common()),
    }


def report_status(report: dict[str, Any], out: Any = None) -> int:
    """The exit status of a sweep: 0 when every request succeeded; else 1, after saying on
    ``out`` (stderr) what the failures were (warm-up included), the commonest first."""
    failures: dict[str, int] = report["failures"]
    if not failures:
        return 0
    out = out or sys.stderr
    print(f"meshllm bench: {sum(failures.values())} requests failed:", file=out)
    for what, count in list(failures.items())[:5]:
        print(f"  {count} x {what}", file=out)
    if len(failures) > 5:
        print(f"  ... and {len(failures) - 5} other kinds", file=out)
    return 1


def _line(lv: Level) -> str:
    return (
        f"c={lv.concurrency:<4} {lv.requests_per_s:8.1f} req/s {lv.tokens_per_s:9.1f} tok/s  "
        f"latency p50/p95/p99 {lv.latency_ms['p50']:.0f}/{lv.latency_ms['p95']:.0f}/"
        f"{lv.latency_ms['p99']:.0f} ms  ttft p50/p95/p99 {lv.ttft_ms['p50']:.0f}/"
        f"{lv.ttft_ms['p95']:.0f}/{lv.ttft_ms['p99']:.0f} ms  errors {lv.errors}"
    )


def print_report(report: dict[str, Any], as_json: bool, out: Any = None) -> None:
    out = out or sys.stdout
    if as_json:
        print(json.dumps(report, indent=2), file=out)
        return
    print(
        f"{'conc':>5} {'req/s':>9} {'tok/s':>10} {'lat p50':>8} {'p95':>7} {'p99':>7} "
        f"{'ttft p50':>9} {'p95':>7} {'p99':>7} {'errors':>7}",
        file=out,
    )
    for lv in report["levels"]:
        lat, ttft = lv["latency_ms"], lv["ttft_ms"]
        print(
            f"{lv['concurrency']:>5} {lv['requests_per_s']:>9.1f} {lv['tokens_per_s']:>10.1f} "
            f"{lat['p50']:>8.1f} {lat['p95']:>7.1f} {lat['p99']:>7.1f} {ttft['p50']:>9.1f} "
            f"{ttft['p95']:>7.1f} {ttft['p99']:>7.1f} {lv['errors']:>7}",
            file=out,
        )
    rec = report["recommended_concurrency"]
    limit = f" and p99 <= {report['max_p99_ms']:g} ms" if report["max_p99_ms"] else ""
    print(
        f"recommended concurrency: {rec if rec is not None else 'none qualifies'} "
        f"(lowest reaching 95% of peak tokens/s with no errors{limit})",
        file=out,
    )
