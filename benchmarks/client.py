"""Client benchmark: a large batch through the mesh, its speed and the client's memory.

A local mesh (``LocalMesh``: a router and two replica processes on the ``demo`` model) serves
batches of N items (default 10,000 and 100,000) sent by a fresh client process per run, so each
run's peak memory is its own. Each item is ``"item {i}"`` from a generator (never a list), with
max_tokens 4, temperature 0, concurrency 64, default retries and pacing.

Two forms of the batch API:

- ``iter``: ``Client.iter_batch`` — results in input order, each dropped after it is counted:
  what a million-item job does (write each result somewhere, keep nothing). The claim under
  test: peak memory under 200 MB and flat in N (peak at 100k / peak at 10k close to 1).
- ``list``: ``Client.generate_batch`` — the same run collected into a list of BatchItem: the list
  itself grows with N by construction; measured to show what one result costs.

Memory is the client process's peak RSS (``ru_maxrss``), next to its RSS after imports and
connecting (before the batch), so the batch's own share is visible. items/s = N / wall time of
the batch call. Server processes share the machine's cores with the client (2 on the dev VM),
so items/s is the mesh's throughput on this box, not the client's limit; the client's CPU
seconds are reported to show its share.

    python benchmarks/client.py                 # 10k and 100k, both forms (~10 min here)
    python benchmarks/client.py --quick         # 2k and 10k, iter only (~1 min)

Figures are printed and written as JSON to ``benchmarks/results/client.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks._common as a script

from benchmarks._common import exit_on_sigterm, machine_info, print_targets, write_json

DEFAULT_OUT = Path("benchmarks/results/client.json")
CHILD_FLAG = "--child"
RSS_TARGET_MB = 200.0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def prompts(count: int) -> Iterator[str]:
    for i in range(count):
        yield f"item {i}"


def child(target: str, count: int, form: str, concurrency: int) -> dict[str, Any]:
    """One batch in this (fresh) process; returns its figures."""
    from meshllm.client import BatchOptions, Client

    with Client(target, timeout=60) as client:
        client.generate("warm up", model="demo", max_tokens=2)
        before = rss_mb()
        cpu0, start = time.process_time(), time.perf_counter()
        options = BatchOptions(concurrency=concurrency)
        if form == "iter":
            ok = failed = 0
            batch = client.iter_batch(
                prompts(count), model="demo", max_tokens=4, temperature=0.0, options=options
            )
            for item in batch:
                ok += item.ok
                failed += not item.ok
        else:
            items = client.generate_batch(
                prompts(count), model="demo", max_tokens=4, temperature=0.0, options=options
            )
            ok = sum(i.ok for i in items)
            failed = len(items) - ok
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "form": form,
        "items": count,
        "ok": ok,
        "failed": failed,
        "seconds": round(elapsed, 2),
        "items_per_s": round(count / elapsed, 1),
        "client_cpu_s": round(cpu, 2),
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "batch_mb": round(peak - before, 1),
    }


def run_child(target: str, count: int, form: str, concurrency: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, CHILD_FLAG, target, str(count), form, str(concurrency)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(sizes: Sequence[int], forms: Sequence[str], concurrency: int) -> list[dict[str, Any]]:
    from meshllm.client.local import LocalMesh, LocalMeshConfig
    from meshllm.replica.models.tiny import DEMO, ensure_model

    ensure_model(DEMO)
    runs = []
    with LocalMesh(LocalMeshConfig(replicas=2, port=0)) as mesh:
        for form in forms:
            for count in sizes:
                print(f"{form:>4} {count:>7} items ...", end=" ", flush=True)
                run = run_child(mesh.address, count, form, concurrency)
                print(
                    f"{run['items_per_s']:7.0f} items/s, peak RSS {run['peak_rss_mb']:.0f} MB "
                    f"(batch {run['batch_mb']:+.1f} MB), {run['failed']} failed",
                    flush=True,
                )
                runs.append(run)
    return runs


def targets(runs: Sequence[dict[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    it = {r["items"]: r for r in runs if r["form"] == "iter"}
    small, large = it[min(sizes)], it[max(sizes)]
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    return {
        "peak_rss_mb_at_largest": {
            "target": f"< {RSS_TARGET_MB:.0f}",
            "value": large["peak_rss_mb"],
            "met": large["peak_rss_mb"] < RSS_TARGET_MB,
        },
        "peak_rss_ratio_largest_to_smallest": {
            "target": "<= 1.10 (flat)",
            "value": ratio,
            "met": ratio <= 1.10,
            "note": f"{max(sizes)} vs {min(sizes)} items, iter form",
        },
    }


def notes(runs: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    lists = sorted((r for r in runs if r["form"] == "list"), key=lambda r: r["items"])
    if len(lists) >= 2:
        a, b = lists[0], lists[-1]
        per_item = (b["batch_mb"] - a["batch_mb"]) * 1024 * 1024 / (b["items"] - a["items"])
        out.append(
            f"list form: about {per_item:.0f} bytes per kept BatchItem "
            f"({a['batch_mb']:+.1f} MB at {a['items']}, {b['batch_mb']:+.1f} MB at {b['items']}): "
            "the list, not the window; iterate iter_batch for flat memory"
        )
    for r in runs:
        share = r["client_cpu_s"] / r["seconds"]
        out.append(
            f"{r['form']} {r['items']}: client used {share:.2f} of a core for "
            f"{r['items_per_s']:.0f} items/s"
        )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default=None, help="comma-separated item counts (10000,100000)")
    p.add_argument("--forms", default=None, help="iter,list (both)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="2000,10000 items, iter only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    sizes = [int(s) for s in (a.sizes or ("2000,10000" if a.quick else "10000,100000")).split(",")]
    forms = (a.forms or ("iter" if a.quick else "iter,list")).split(",")
    exit_on_sigterm()
    started = time.perf_counter()
    runs = measure(sizes, forms, a.concurrency)
    met = targets(runs, sizes)
    print_targets(met)
    print("\nnotes:")
    for note in notes(runs):
        print(f"- {note}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    write_json(
        a.out,
        {
            "machine": machine_info(),
            "settings": {
                "sizes": sizes,
                "forms": forms,
                "concurrency": a.concurrency,
                "max_tokens": 4,
                "model": "demo",
                "replicas": 2,
            },
            "runs": runs,
            "targets": met,
            "notes": notes(runs),
        },
    )


if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD_FLAG]:
        target, count, form, conc = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        print(json.dumps(child(target, count, form, conc)))
    else:
        main()
