"""Quota benchmark: what API keys and per-tenant quotas cost a request at the router.

Two measurements in one run (``make bench-quota``):

(a) STORE. In this process, one tenant with all four limits set high enough never to refuse:
    reserve + settle pairs per second, one at a time and 32 at once, for the in-memory store
    and for the Redis store on a local ``redis-server`` (started here on a free port, no
    persistence). The Redis figures are one Lua script call each way over loopback.

(b) END TO END. One replica (``demo`` model, ``--batch-window-ms 0``: time to first token is
    almost all gRPC and event loops) and three routers in front of it, driven in rotating
    rounds so drift hits each alike:

    - ``open``: ``--no-auth`` (no key, no quota: the router of benchmarks/router.py);
    - ``memory``: an API key, a tenant with all four limits (never reached), the memory store;
    - ``redis``: the same tenant, the Redis store.

    C closed-loop clients stream max_tokens 8 (C = 1: time to first token; C = 32: requests/s).
    Reported: each path's TTFT p50 minus ``open``'s (what admission adds) and requests/s
    relative to ``open``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks._common as a script

from benchmarks._common import (
    Process,
    closed_loop,
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
from meshllm.router.quota import Demand, QuotaStore, TenantLimits
from meshllm.router.quota.memory import MemoryQuotaStore
from meshllm.router.quota.redis_store import RedisQuotaStore
from meshllm.router.tenants import hash_key

KEY = "bench-key"
LIMITS = TenantLimits(
    requests_per_minute=10**9,
    tokens_per_minute=10**12,
    concurrent_requests=10**6,
    tokens_per_day=10**15,
)
PATHS = ("open", "memory", "redis")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--store-seconds", type=float, default=2.0, help="seconds per store cell")
    p.add_argument("--rounds", type=int, default=3, help="rounds per concurrency level")
    p.add_argument("--round", type=float, default=3.0, help="seconds per path per round")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quota.json"))
    return p.parse_args(argv)


# -- (a) store ----------------------------------------------------------------------------------


async def store_rate(store: QuotaStore, concurrency: int, seconds: float) -> float:
    """reserve + settle pairs per second with ``concurrency`` callers."""
    end, done = time.perf_counter() + seconds, 0

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < end:
            reservation = await store.reserve("bench", LIMITS, Demand(100))
            await store.settle(reservation, 60)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def measure_stores(redis_url: str, seconds: float) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    redis_store = RedisQuotaStore(redis_url, concurrency_retry_s=1.0, lease_s=900.0, timeout_s=1.0)
    for name, store in (
        ("memory", MemoryQuotaStore(concurrency_retry_s=1.0)),
        ("redis", redis_store),
    ):
        out[name] = {f"c{c}": await store_rate(store, c, seconds) for c in (1, 32)}
        print(
            f"  {name:7s} reserve+settle/s: 1 at a time {out[name]['c1']:9.0f}   32 at once {out[name]['c32']:9.0f}"
        )
    await redis_store.close()
    return out


# -- (b) end to end -----------------------------------------------------------------------------


class KeyedStub:
    """A Generation stub that sends the API key with every call (closed_loop's stub)."""

    def __init__(self, channel: grpc.aio.Channel, key: str | None) -> None:
        self._stub = gen_grpc.GenerationStub(channel)
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()

    def GenerateStream(self, request: gen.GenerateRequest) -> Any:
        return self._stub.GenerateStream(request, metadata=self._metadata)

    def ListModels(self, request: gen.ListModelsRequest, timeout: float) -> Any:
        return self._stub.ListModels(request, timeout=timeout, metadata=self._metadata)


async def measure_paths(ports: dict[str, int], opts: argparse.Namespace) -> dict[str, Any]:
    channels = {
        name: grpc.aio.insecure_channel(f"127.0.0.1:{port}") for name, port in ports.items()
    }
    stubs = {name: KeyedStub(ch, None if name == "open" else KEY) for name, ch in channels.items()}
    request = gen.GenerateRequest(model="demo", prompt="hello mesh", max_tokens=8, temperature=0)
    ttft: dict[str, list[float]] = {p: [] for p in PATHS}
    rps: dict[str, list[float]] = {p: [] for p in PATHS}
    for name in PATHS:  # warm up
        await closed_loop(stubs[name], [request] * 4, 0.5)
    for r in range(opts.rounds):
        order = PATHS[r % 3 :] + PATHS[: r % 3]
        for name in order:
            records, _ = await closed_loop(stubs[name], [request], opts.round)
            ttft[name] += [rec.ttft_s for rec in records]
        for name in order:
            records, wall = await closed_loop(stubs[name], [request] * 32, opts.round)
            rps[name].append(len(records) / wall)
        print(
            f"  round {r + 1}: "
            + "  ".join(f"{n} p50 {percentile(ttft[n], 0.5) * 1e3:.2f} ms" for n in PATHS)
        )
    for channel in channels.values():
        await channel.close()
    open_p50, open_rps = percentile(ttft["open"], 0.5), sum(rps["open"]) / len(rps["open"])
    out: dict[str, Any] = {}
    for name in PATHS:
        p50, mean_rps = percentile(ttft[name], 0.5), sum(rps[name]) / len(rps[name])
        out[name] = {
            "ttft_p50_ms": p50 * 1e3,
            "ttft_p99_ms": percentile(ttft[name], 0.99) * 1e3,
            "added_ttft_p50_ms": (p50 - open_p50) * 1e3,
            "requests_per_s_c32": mean_rps,
            "requests_per_s_vs_open": mean_rps / open_rps,
            "samples_c1": len(ttft[name]),
        }
    return out


async def start_mesh(redis_url: str, tenants: Path) -> tuple[list[Process], dict[str, int]]:
    replica_port = free_port()
    procs = [start_process(replica_args(replica_port, "demo", "--batch-window-ms", "0"))]
    ports = {name: free_port() for name in PATHS}
    keyed = ["--tenants-file", str(tenants)]
    procs.append(start_process(router_args(ports["open"], [replica_port])))
    for name, extra in (
        ("memory", keyed),
        ("redis", [*keyed, "--quota-store", "redis", "--redis-url", redis_url]),
    ):
        args = [a for a in router_args(ports[name], [replica_port]) if a != "--no-auth"]
        procs.append(start_process([*args, *extra]))
    for name, port in ports.items():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_ready(KeyedStub(channel, None if name == "open" else KEY), procs, "demo", 1)
    return procs, ports


async def redis_server() -> AsyncIterator[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        stdout=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(0.3)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        await proc.wait()


async def measure(opts: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async for url in redis_server():
        print("(a) quota store, in this process")
        results["store"] = await measure_stores(url, opts.store_seconds)
        print("(b) end to end: TTFT at concurrency 1, requests/s at 32")
        with tempfile.TemporaryDirectory() as tmp:
            tenants = Path(tmp) / "tenants.toml"
            limits = "".join(f"{k} = {v}\n" for k, v in vars(LIMITS).items())
            tenants.write_text(f'[[tenants]]\nname = "bench"\nkeys = ["{hash_key(KEY)}"]\n{limits}')
            procs, ports = await start_mesh(url, tenants)
            try:
                results["paths"] = await measure_paths(ports, opts)
            finally:
                stop_processes(procs)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    started = time.perf_counter()
    results = asyncio.run(measure(opts))
    print()
    for name, r in results["paths"].items():
        print(
            f"{name:7s} TTFT p50 {r['ttft_p50_ms']:6.2f} ms (+{r['added_ttft_p50_ms']:5.2f} vs open)"
            f"  p99 {r['ttft_p99_ms']:6.2f} ms   {r['requests_per_s_c32']:7.1f} req/s at 32"
            f" ({r['requests_per_s_vs_open']:.2f} of open)"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    write_json(
        opts.out,
        {
            "machine": machine_info(),
            "settings": {k: str(v) for k, v in vars(opts).items()},
            **results,
        },
    )


if __name__ == "__main__":
    main()
