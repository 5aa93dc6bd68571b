"""Fair-sharing benchmark: a light interactive tenant beside a flooding one, tokens split by
weight, and a high-priority lane under a flood; the router's fair queue against first come,
first served (``--no-fair-queue``), in one run.

Two replicas run the simulated engine (``sim``: continuous batching, 8 slots each, every step
4 ms of "device" time with the GIL released plus a little Python), so 16 slots in all; two
routers run in front of the same replicas, one with the fair queue (the default) and one
without. The tenants (``flood``, ``light``, ``a`` weight 1, ``b`` weight 3) come from a
tenants file this script writes. Closed-loop clients stream 32 to 96 tokens per request
(64 on average, each client's lengths in a fixed pseudo-random order: equal lengths would keep
the flood's requests starting and ending in waves).

Phases, each ``--seconds`` long after a 2 s warm-up (not counted), on both routers:
1. ``light`` alone: 4 clients.
2. ``light`` (4 clients) with ``flood`` (32 clients: 8x the concurrency, far past 16 slots).
3. ``a`` and ``b`` both flooding (24 clients each): tokens served to each.
4. ``flood`` (32 clients at priority 0) with 2 clients of the same tenant at priority 5.

Then two fair routers sharing one ``redis-server`` (quota store and fair-queue counters):
5. ``flood`` through both (16 clients each), ``light`` through the first (4 clients).
6. ``a`` and ``b`` each through both routers (12 clients per router each), and
7. ``a`` only through the first, ``b`` only through the second (24 clients each): what the
   shared counters cannot do, as each router then queues one tenant only.

Reports the light tenant's TTFT p99 with the flood / alone (target <= 1.5 with the fair
queue), ``b``'s share of tokens against its weight's 75 % (target within 10 %), and the
high-lane TTFT p99. Run from the repository root::

    python benchmarks/fairness.py            # about two minutes
    python benchmarks/fairness.py --quick    # smoke run

Figures print and go to ``benchmarks/results/fairness.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks._common as a script

from benchmarks._common import (
    exit_on_sigterm,
    machine_info,
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
from meshllm.router.tenants import hash_key

SLOTS_PER_REPLICA = 8
REPLICAS = 2
TOKENS = 64
ENGINE = ["--engine", "sim", "--max-batch-size", str(SLOTS_PER_REPLICA)]
COSTS = ["--option", "step_ms=4", "--option", "step_python_us=50", "--option", "seq_python_us=5"]
TENANTS = {  # name: (weight, max_priority)
    "flood": (1.0, 5),
    "light": (1.0, 0),
    "a": (1.0, 0),
    "b": (3.0, 0),
}
DEFAULT_OUT = Path("benchmarks/results/fairness.json")
WARM_UP_S = 2.0


def key(tenant: str) -> str:
    return f"bench-{tenant}-key"


def write_tenants(path: Path) -> None:
    path.write_text(
        "".join(
            f'[[tenants]]\nname = "{name}"\nkeys = ["{hash_key(key(name))}"]\n'
            f"weight = {weight}\nmax_priority = {ceiling}\nmax_queued = 1000\n\n"
            for name, (weight, ceiling) in TENANTS.items()
        )
    )


@dataclass(frozen=True)
class Done:
    tenant: str
    priority: int
    ttft_s: float
    tokens: int
    start: float
    end: float


async def client(stub: Any, tenant: str, priority: int, end: float, index: int) -> list[Done]:
    """Closed loop: the next request goes out when the previous one ended."""
    out: list[Done] = []
    metadata = (("authorization", f"Bearer {key(tenant)}"),)
    lengths = random.Random(f"{tenant}{priority}{index}")
    while time.perf_counter() < end:
        request = gen.GenerateRequest(
            model="demo",
            token_ids=[10 + index % 50],
            max_tokens=lengths.randint(TOKENS // 2, TOKENS * 3 // 2),
            priority=priority,
        )
        start, first, tokens = time.perf_counter(), None, 0
        async for chunk in stub.GenerateStream(request, metadata=metadata):
            if first is None and chunk.token_ids:
                first = time.perf_counter()
            tokens += len(chunk.token_ids)
        now = time.perf_counter()
        out.append(Done(tenant, priority, (first or now) - start, tokens, start, now))
    return out


async def phase(stub: Any, groups: Sequence[tuple[str, int, int]], seconds: float) -> list[Done]:
    """``groups``: (tenant, priority, clients), all running together for ``WARM_UP_S`` plus
    ``seconds``; what counts is the requests that started after the warm-up (all clients
    starting at once is a transient of its own: every slot frees at the same moment)."""
    start = time.perf_counter()
    end = start + WARM_UP_S + seconds
    loops = [
        client(stub, tenant, priority, end, i)
        for tenant, priority, count in groups
        for i in range(count)
    ]
    done = [d for ds in await asyncio.gather(*loops) for d in ds]
    return [d for d in done if d.start >= start + WARM_UP_S]


def ttft(done: Sequence[Done], tenant: str, priority: int | None = None) -> dict[str, float]:
    values = [d.ttft_s for d in done if d.tenant == tenant and priority in (None, d.priority)]
    return {
        "requests": len(values),
        "ttft_p50_ms": percentile(values, 0.50) * 1e3,
        "ttft_p99_ms": percentile(values, 0.99) * 1e3,
    }


def tokens(done: Sequence[Done], tenant: str) -> int:
    return sum(d.tokens for d in done if d.tenant == tenant)


async def run_router(stub: Any, seconds: float) -> dict[str, Any]:
    alone = await phase(stub, [("light", 0, 4)], seconds)
    flooded = await phase(stub, [("light", 0, 4), ("flood", 0, 32)], seconds)
    weights = await phase(stub, [("a", 0, 24), ("b", 0, 24)], seconds)
    lanes = await phase(stub, [("flood", 0, 32), ("flood", 5, 2)], seconds)
    light_alone, light_flooded = ttft(alone, "light"), ttft(flooded, "light")
    a, b = tokens(weights, "a"), tokens(weights, "b")
    return {
        "light_alone": light_alone,
        "light_with_flood": light_flooded,
        "flood": ttft(flooded, "flood") | {"tokens": tokens(flooded, "flood")},
        "light_tokens_with_flood": tokens(flooded, "light"),
        "light_ttft_p99_ratio": light_flooded["ttft_p99_ms"] / light_alone["ttft_p99_ms"],
        "tokens_a": a,
        "tokens_b": b,
        "b_share": b / max(a + b, 1),
        "high_lane": ttft(lanes, "flood", 5),
        "low_lane": ttft(lanes, "flood", 0),
    }


async def run_two_routers(stubs: Sequence[Any], seconds: float) -> dict[str, Any]:
    one, two = stubs
    start = time.perf_counter()
    alone = await phase(one, [("light", 0, 4)], seconds)
    flooded_parts = await asyncio.gather(
        phase(one, [("light", 0, 4), ("flood", 0, 16)], seconds),
        phase(two, [("flood", 0, 16)], seconds),
    )
    both = await asyncio.gather(
        phase(one, [("a", 0, 12), ("b", 0, 12)], seconds),
        phase(two, [("a", 0, 12), ("b", 0, 12)], seconds),
    )
    apart = await asyncio.gather(
        phase(one, [("a", 0, 24)], seconds), phase(two, [("b", 0, 24)], seconds)
    )
    flooded = [d for part in flooded_parts for d in part]
    shared, split = [d for x in both for d in x], [d for x in apart for d in x]
    light_alone, light_flooded = ttft(alone, "light"), ttft(flooded, "light")
    return {
        "light_alone": light_alone,
        "light_with_flood": light_flooded,
        "light_ttft_p99_ratio": light_flooded["ttft_p99_ms"] / light_alone["ttft_p99_ms"],
        "b_share_through_both": tokens(shared, "b") / max(sum(d.tokens for d in shared), 1),
        "b_share_one_router_each": tokens(split, "b") / max(sum(d.tokens for d in split), 1),
        "seconds": time.perf_counter() - start,
    }


def start_redis(port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: `make setup` installs Debian's package")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    replica_ports = [free_port() for _ in range(REPLICAS)]
    fair_port, fcfs_port = free_port(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="meshllm-fairness-"))
    tenants = folder / "tenants.toml"
    write_tenants(tenants)
    procs = [
        start_process(replica_args(p, "demo", *ENGINE, *COSTS, f"--replica-id=r{i}"))
        for i, p in enumerate(replica_ports)
    ]
    try:
        procs.append(
            start_process(router_args(fair_port, replica_ports, tenants_file=str(tenants)))
        )
        procs.append(
            start_process(
                router_args(fcfs_port, replica_ports, "--no-fair-queue", tenants_file=str(tenants))
            )
        )
        results: dict[str, Any] = {}
        for mode, port in (("fair", fair_port), ("fcfs", fcfs_port)):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = gen_grpc.GenerationStub(channel)
                await wait_ready(_Keyed(stub), procs, "demo", replicas=REPLICAS)
                results[mode] = await run_router(stub, args.seconds)
            print_mode(mode, results[mode])
        stop_processes(procs[REPLICAS:])  # the single routers
        del procs[REPLICAS:]
        redis_port = free_port()
        procs.append(start_redis(redis_port))
        os.environ["MESHLLM_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"  # not on argv
        shared = ["--quota-store", "redis", *args.router_flags]
        ports = [free_port(), free_port()]
        for port in ports:
            procs.append(
                start_process(router_args(port, replica_ports, *shared, tenants_file=str(tenants)))
            )
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for port in ports]
        try:
            stubs = [gen_grpc.GenerationStub(c) for c in channels]
            for stub in stubs:
                await wait_ready(_Keyed(stub), procs, "demo", replicas=REPLICAS)
            results["two_routers"] = await run_two_routers(stubs, args.seconds)
        finally:
            for channel in channels:
                await channel.close()
        print_two(results["two_routers"])
    finally:
        stop_processes(procs)
    return results


def print_two(r: dict[str, Any]) -> None:
    la, lf = r["light_alone"], r["light_with_flood"]
    print("\n== two fair routers, one Redis ==")
    print(
        f"light alone p99 {la['ttft_p99_ms']:.1f} ms, with the flood through both routers "
        f"{lf['ttft_p99_ms']:.1f} ms (ratio {r['light_ttft_p99_ratio']:.2f})"
    )
    print(
        f"weights 1:3: b share {r['b_share_through_both']:.3f} with both tenants on both "
        f"routers, {r['b_share_one_router_each']:.3f} with one router each"
    )


class _Keyed:
    """ListModels with a key (``wait_ready`` calls it without metadata)."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    async def ListModels(self, request: gen.ListModelsRequest, timeout: float) -> Any:
        metadata = (("authorization", f"Bearer {key('light')}"),)
        return await self._stub.ListModels(request, timeout=timeout, metadata=metadata)


def print_mode(mode: str, r: dict[str, Any]) -> None:
    la, lf, fl = r["light_alone"], r["light_with_flood"], r["flood"]
    print(f"\n== {mode} ==")
    print(
        f"light alone: TTFT p50/p99 {la['ttft_p50_ms']:.1f}/{la['ttft_p99_ms']:.1f} ms "
        f"({la['requests']} requests)"
    )
    print(
        f"light with flood: TTFT p50/p99 {lf['ttft_p50_ms']:.1f}/{lf['ttft_p99_ms']:.1f} ms "
        f"({lf['requests']} requests), flood {fl['requests']} requests, "
        f"TTFT p99 {fl['ttft_p99_ms']:.0f} ms; ratio p99 {r['light_ttft_p99_ratio']:.2f}"
    )
    print(f"weights 1:3: a {r['tokens_a']} tokens, b {r['tokens_b']} (b share {r['b_share']:.3f})")
    hi, lo = r["high_lane"], r["low_lane"]
    print(
        f"lanes: priority 5 TTFT p50/p99 {hi['ttft_p50_ms']:.1f}/{hi['ttft_p99_ms']:.1f} ms, "
        f"priority 0 {lo['ttft_p50_ms']:.1f}/{lo['ttft_p99_ms']:.1f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--seconds", type=float, default=12.0, help="length of each phase")
    p.add_argument("--quick", action="store_true", help="3 s phases (a smoke run)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--two-router-flag",
        dest="router_flags",
        action="append",
        default=[],
        help="a flag for the two routers sharing Redis (e.g. --two-router-flag=--report-interval-ms=50)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = 3.0
    exit_on_sigterm()
    results = asyncio.run(run(args))
    fair = results["fair"]
    report = {
        "machine": machine_info(),
        "settings": {
            "replicas": REPLICAS,
            "slots_per_replica": SLOTS_PER_REPLICA,
            "tokens": TOKENS,
            "seconds": args.seconds,
            "engine": ENGINE + COSTS,
            "tenants": TENANTS,
        },
        "results": results,
        "targets": {
            "light_ttft_p99_ratio_le_1_5": fair["light_ttft_p99_ratio"] <= 1.5,
            "b_share_within_10pct_of_0_75": abs(fair["b_share"] - 0.75) <= 0.075,
        },
    }
    write_json(args.out, report)
    print(f"\ntargets: {report['targets']}; written to {args.out}")


if __name__ == "__main__":
    main()
