"""Outlier ejection benchmark: what a replica that fails every request fast costs, without and
with ejection (docs/router.md, "Outlier ejection").

Three replica processes on the ``demo`` model (float32, d_model 64, 2 layers): two healthy ones
(``python -m meshllm.replica``) and one test double, this script run with
``--serve-failing-replica PORT METRICS_PORT``: a real replica server and engine whose
``generate`` raises INTERNAL ("engine failed: ... CUDA error ...") at once, as a replica with a
broken CUDA context does, while its load reports go on saying READY with an empty queue. Two
router processes sit in front of the same three replicas, one with ``--no-outlier-ejection``,
one with the defaults (``[router.outliers]``: eject after 5 failures in a row or half of 5 or
more within 10 s, 5 s x ejections in a row up to 60 s, a 10 s ramp); one is driven at a time,
``off`` first, each by C closed-loop clients calling ``GenerateStream`` (max_tokens 16,
temperature 0) for ``--duration`` seconds.

Per phase: attempts each replica received (its ``meshllm_replica_requests_total``, before and
after), the failing replica's share of them, failed requests at the client, retries
(``meshllm_router_retries_total``), ejections (``meshllm_router_outlier_ejections_total``), and
client-side latency (send to the last chunk) and TTFT (send to the first chunk with token ids),
p50 and p99 of the requests that succeeded. The failing replica's counter is also read once a
second, for a timeline of the attempts it got. Ratios compare the two phases of one run.

Run it from the repository root::

    python benchmarks/outliers.py            # 2 x 20 s, about a minute
    python benchmarks/outliers.py --quick    # 2 x 5 s

Figures are printed and written as JSON to ``benchmarks/results/outliers.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks._common as a script

from benchmarks._common import (
    Process,
    exit_on_sigterm,
    machine_info,
    one_request,
    percentile,
    replica_args,
    router_args,
    start_process,
    stop_processes,
    wait_ready,
    write_json,
)
from meshllm.api.errors import Internal
from meshllm.api.spec import ModelSpec
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client.local import free_port
from meshllm.replica.config import ReplicaConfig
from meshllm.replica.models.tiny import DEMO, ensure_model
from meshllm.replica.server import ReplicaServer
from meshllm.replica.types import Chunk, GenerationRequest
from meshllm.server.serving import serve_until_signal

DEFAULT_OUT = Path("benchmarks/results/outliers.json")
FAILING_FLAG = "--serve-failing-replica"
"""This script with this flag serves the failing replica (the test double) instead."""
FAILING = "failing"
HEALTHY = ("healthy-1", "healthy-2")


# -- the failing replica (a test double around a real replica server) ---------------------------


class FailingReplica:
    """A real replica on ``demo`` whose every request fails at once with INTERNAL."""

    def __init__(self, port: int, metrics_port: int) -> None:
        self._spec = ModelSpec(id="demo", path="demo")
        self._server = ReplicaServer(
            ReplicaConfig(
                host="127.0.0.1",
                port=port,
                replica_id=FAILING,
                model=self._spec,
                metrics_port=metrics_port,
            )
        )

    async def start(self) -> int:
        port = await self._server.start()
        replica = self._server.replica
        assert replica is not None
        await replica.load(self._spec, wait=True)
        replica.generate = _fail  # type: ignore[method-assign]
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        await self._server.stop(grace_s)


async def _fail(req: GenerationRequest) -> AsyncIterator[Chunk]:
    raise Internal("engine failed: RuntimeError: CUDA error: an illegal memory access")
    yield  # an async generator, like the real one


def failing_args(port: int, metrics_port: int) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        FAILING_FLAG,
        str(port),
        str(metrics_port),
    ]


# -- metrics ------------------------------------------------------------------------------------


def counters(port: int, name: str, label: str) -> dict[str, float]:
    """The samples of counter ``name`` on the /metrics endpoint at ``port``, summed by ``label``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                key = s.labels.get(label, "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def attempts(port: int) -> float:
    """Requests a replica received, whatever their end."""
    return sum(counters(port, "meshllm_replica_requests_total", "code").values())


# -- one phase ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    ejection: str
    clients: int
    duration_s: float
    requests: int
    failed_requests: int
    attempts: dict[str, int]
    failing_share: float
    """The failing replica's share of all attempts."""
    retries: int
    retries_by_code: dict[str, int]
    ejections: int
    latency_p50_ms: float
    latency_p99_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    failing_attempts_per_s: list[int]
    """Attempts on the failing replica in each second of the phase."""


async def clients(port: int, count: int, seconds: float) -> tuple[list[Any], int]:
    """``count`` closed-loop clients for ``seconds``: the records of successes, the failures."""
    failures = 0

    async def loop(stub: Any, index: int, end: float) -> list[Any]:
        nonlocal failures
        records, i = [], 0
        while time.perf_counter() < end:
            req = gen.GenerateRequest(
                model="demo", prompt=f"client {index} request {i}", max_tokens=16, temperature=0
            )
            i += 1
            try:
                records.append(await one_request(stub, req))
            except grpc.aio.AioRpcError:
                failures += 1
        return records

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gen_grpc.GenerationStub(channel)
        end = time.perf_counter() + seconds
        done = await asyncio.gather(*(loop(stub, c, end) for c in range(count)))
    return [r for rs in done for r in rs], failures


async def timeline(metrics_port: int, seconds: float) -> list[int]:
    """The failing replica's attempts in each second, read from its counter."""
    counts, last = [], await asyncio.to_thread(attempts, metrics_port)
    for _ in range(int(seconds)):
        await asyncio.sleep(1.0)
        now = await asyncio.to_thread(attempts, metrics_port)
        counts.append(int(now - last))
        last = now
    return counts


async def run_phase(
    name: str, router: tuple[int, int], replicas: dict[str, int], count: int, seconds: float
) -> Phase:
    port, router_metrics = router
    before = {n: attempts(p) for n, p in replicas.items()}
    retries_before = counters(router_metrics, "meshllm_router_retries_total", "code")
    (records, failures), per_second = await asyncio.gather(
        clients(port, count, seconds), timeline(replicas[FAILING], seconds)
    )
    got = {n: int(attempts(p) - before[n]) for n, p in replicas.items()}
    retries_after = counters(router_metrics, "meshllm_router_retries_total", "code")
    retries = {
        code: int(v - retries_before.get(code, 0.0))
        for code, v in retries_after.items()
        if v > retries_before.get(code, 0.0)
    }
    ejections = counters(router_metrics, "meshllm_router_outlier_ejections_total", "replica")
    latencies = [r.latency_s * 1e3 for r in records]
    ttfts = [r.ttft_s * 1e3 for r in records]
    return Phase(
        ejection=name,
        clients=count,
        duration_s=seconds,
        requests=len(records) + failures,
        failed_requests=failures,
        attempts=got,
        failing_share=got[FAILING] / max(sum(got.values()), 1),
        retries=sum(retries.values()),
        retries_by_code=retries,
        ejections=int(ejections.get(FAILING, 0.0)),
        latency_p50_ms=percentile(latencies, 0.5),
        latency_p99_ms=percentile(latencies, 0.99),
        ttft_p50_ms=percentile(ttfts, 0.5),
        ttft_p99_ms=percentile(ttfts, 0.99),
        failing_attempts_per_s=per_second,
    )


# -- the run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    duration_s: float
    clients: int
    out: Path


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=None, help="seconds per phase (20)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop clients (8)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file ({DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 s per phase")
    a = p.parse_args(argv)
    duration = a.duration if a.duration is not None else (5.0 if a.quick else 20.0)
    return Options(duration_s=duration, clients=a.clients, out=a.out)


async def measure(opts: Options) -> list[Phase]:
    ensure_model(DEMO)
    ports = {n: (free_port(), free_port()) for n in (*HEALTHY, FAILING)}
    fronts = {n: (free_port(), free_port()) for n in ("off", "on")}
    replicas: list[Process] = []
    routers: list[Process] = []
    try:
        for name in HEALTHY:
            port, metrics = ports[name]
            extra = ("--replica-id", name, "--metrics-port", str(metrics))
            replicas.append(start_process(replica_args(port, "demo", *extra)))
        replicas.append(start_process(failing_args(*ports[FAILING])))
        replica_ports = [p for p, _ in ports.values()]
        for name, flag in (("off", "--no-outlier-ejection"), ("on", "--outlier-ejection")):
            port, metrics = fronts[name]
            routers.append(
                start_process(
                    router_args(port, replica_ports, flag, "--metrics-port", str(metrics))
                )
            )
        for port, _ in fronts.values():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = gen_grpc.GenerationStub(channel)
                await wait_ready(stub, [*replicas, *routers], "demo", replicas=3)
        metrics_ports = {n: m for n, (_, m) in ports.items()}
        phases = []
        for name in ("off", "on"):
            print(f"ejection {name}: {opts.clients} clients for {opts.duration_s:g} s ...")
            phases.append(
                await run_phase(name, fronts[name], metrics_ports, opts.clients, opts.duration_s)
            )
        return phases
    finally:
        stop_processes(routers)
        stop_processes(replicas)


def report(opts: Options, phases: list[Phase]) -> dict[str, Any]:
    off, on = phases
    print()
    print(
        f"{'ejection':>8} {'requests':>8} {'failed':>6} {'failing share':>13} {'retries':>7} "
        f"{'ejections':>9} {'lat p50':>8} {'lat p99':>8} {'ttft p99':>8}"
    )
    for p in phases:
        print(
            f"{p.ejection:>8} {p.requests:>8} {p.failed_requests:>6} {p.failing_share:>13.1%} "
            f"{p.retries:>7} {p.ejections:>9} {p.latency_p50_ms:>6.1f}ms {p.latency_p99_ms:>6.1f}ms "
            f"{p.ttft_p99_ms:>6.1f}ms"
        )
    for p in phases:
        print(
            f"failing replica's attempts per second, ejection {p.ejection}: {p.failing_attempts_per_s}"
        )
    ratios = {
        "failing_share_on_over_off": on.failing_share / off.failing_share
        if off.failing_share
        else 0.0,
        "retries_on_over_off": on.retries / off.retries if off.retries else 0.0,
        "latency_p99_on_over_off": on.latency_p99_ms / off.latency_p99_ms,
        "ttft_p99_on_over_off": on.ttft_p99_ms / off.ttft_p99_ms,
        "requests_on_over_off": on.requests / off.requests,
    }
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    return {
        "machine": machine_info(),
        "settings": {**asdict(opts), "out": str(opts.out), "max_tokens": 16, "model": "demo"},
        "phases": [asdict(p) for p in phases],
        "ratios": ratios,
    }


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    exit_on_sigterm()
    phases = asyncio.run(measure(opts))
    write_json(opts.out, report(opts, phases))


if __name__ == "__main__":
    if sys.argv[1:2] == [FAILING_FLAG]:
        port, metrics_port = int(sys.argv[2]), int(sys.argv[3])
        asyncio.run(serve_until_signal(FailingReplica(port, metrics_port), "stopping"))
    else:
        main()
