"""Admin benchmark: what load control costs, and what clients see while it happens.

One run (``make bench-admin``), real processes: three idle replicas and a router whose catalog
holds ``bench`` (desired 0, max 3). Measured in one run, so compare the ratios:

(a) LOAD. The same model loaded on the same warm replica (engine imported, files read once)
    directly through its ``ReplicaControl.LoadModel`` (wait) and through the router's
    ``Admin.LoadModel`` (wait): wall time of each, their ratio, and the time from the admin
    call's return to the first reply of a request through the router.
(b) SCALE-DOWN UNDER LOAD. C closed-loop streaming clients on 2 replicas; scale to 1 in the
    middle. Requests/s in the seconds before and after (ratio), how long the scale call took,
    and the failures (the target is none).
(c) ROUTER RESTART. The router is stopped and started again: time from its start to the first
    served request, and whether any replica reloaded (its model's load counter is read back).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks._common as a script

from benchmarks._common import (
    Process,
    exit_on_sigterm,
    machine_info,
    start_process,
    stop_processes,
    write_json,
)
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.api.v1 import replica_control_pb2_grpc as rc_grpc
from meshllm.client.local import free_port

CATALOG = '[models.bench]\npath = "bench"\ncompute_type = "int8"\nmax_replicas = 3\n'
REQUEST = gen.GenerateRequest(model="bench", prompt="benchmark", max_tokens=32)


def replica(port: int, name: str) -> Process:
    return start_process(
        [
            sys.executable,
            "-m",
            "meshllm.replica",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--replica-id",
            name,
            "--log-level",
            "WARNING",
        ]
    )


def router(port: int, replicas: list[int], config: Path) -> Process:
    flags = [a for p in replicas for a in ("--replica", f"127.0.0.1:{p}")]
    return start_process(
        [
            sys.executable,
            "-m",
            "meshllm.router",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--config",
            str(config),
            "--no-auth",
            "--report-interval-ms",
            "100",
            "--log-level",
            "WARNING",
            *flags,
        ]
    )


async def until_ok(call: Any, timeout_s: float = 60.0) -> float:
    """Retry ``call()`` until it succeeds; the seconds it took."""
    start = time.perf_counter()
    while True:
        try:
            await call()
            return time.perf_counter() - start
        except grpc.aio.AioRpcError:
            if time.perf_counter() - start > timeout_s:
                raise
            await asyncio.sleep(0.01)


async def measure_load(ports: list[int], router_port: int) -> dict[str, float]:
    spec = rc.ModelSpec(id="bench", path="bench", compute_type="int8")
    direct = 0.0
    for port in reversed(ports):  # every replica imports its engine and reads the model once
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            control = rc_grpc.ReplicaControlStub(ch)
            await until_ok(lambda: control.GetStatus(rc.GetStatusRequest()))  # noqa: B023
            for _ in range(2):
                start = time.perf_counter()
                await control.LoadModel(rc.LoadModelRequest(spec=spec, wait=True))
                direct = time.perf_counter() - start  # the last: r0, warm, as the admin's below
                await control.UnloadModel(rc.UnloadModelRequest(drain_timeout_s=1))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router_port}") as ch:
        admin, generation = adm_grpc.AdminStub(ch), gen_grpc.GenerationStub(ch)
        await until_ok(lambda: admin.ListReplicas(adm.ListReplicasRequest()))
        await asyncio.sleep(1.0)  # every replica reported
        start = time.perf_counter()
        await admin.LoadModel(adm.AdminLoadModelRequest(model="bench", replicas=1, wait=True))
        routed = time.perf_counter() - start
        first_token = await until_ok(lambda: generation.Generate(REQUEST))
    return {
        "direct_load_s": direct,
        "admin_load_s": routed,
        "admin_over_direct": routed / direct,
        "load_to_first_reply_s": first_token,
    }


async def measure_scale_down(router_port: int, clients: int, seconds: float) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router_port}") as ch:
        admin, stub = adm_grpc.AdminStub(ch), gen_grpc.GenerationStub(ch)
        await admin.ScaleModel(adm.ScaleModelRequest(model="bench", replicas=2, wait=True))
        await asyncio.sleep(0.5)
        done: list[float] = []
        failures: list[str] = []
        stop = time.perf_counter() + 2 * seconds

        async def client() -> None:
            while time.perf_counter() < stop:
                try:
                    async for _ in stub.GenerateStream(REQUEST):
                        pass
                    done.append(time.perf_counter())
                except grpc.aio.AioRpcError as e:
                    failures.append(e.code().name)

        start = time.perf_counter()
        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        await asyncio.sleep(seconds)
        scale_start = time.perf_counter()
        await admin.ScaleModel(adm.ScaleModelRequest(model="bench", replicas=1, drain_timeout_s=30))
        scale_s = time.perf_counter() - scale_start
        await asyncio.gather(*tasks)
        before = sum(start + 0.5 <= t < scale_start for t in done) / (scale_start - start - 0.5)
        after = sum(t >= scale_start + scale_s for t in done) / (stop - scale_start - scale_s)
    return {
        "clients": clients,
        "rps_two_replicas": before,
        "rps_one_replica": after,
        "one_over_two": after / before,
        "scale_down_s": scale_s,
        "requests": len(done),
        "failures": len(failures),
        "failure_codes": sorted(set(failures)),
    }


async def watch_states(port: int, seen: set[str], stop: asyncio.Event) -> None:
    """Every state one replica reports until ``stop``: a reload would show ``LOADING``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = rc_grpc.ReplicaControlStub(ch).WatchLoad(rc.WatchLoadRequest(interval_ms=20))
        waiter = asyncio.ensure_future(stop.wait())
        while not stop.is_set():
            read = asyncio.ensure_future(call.read())
            await asyncio.wait({read, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if read.done() and read.result() is not grpc.aio.EOF:
                seen.add(rc.ReplicaState.Name(read.result().state))
        call.cancel()


async def measure_restart(
    front: Process, ports: list[int], router_port: int, config: Path
) -> tuple[Process, dict[str, Any]]:
    seen: set[str] = set()
    stop = asyncio.Event()
    watchers = [asyncio.create_task(watch_states(p, seen, stop)) for p in ports]
    await asyncio.sleep(0.2)
    stop_processes([front])
    started = time.perf_counter()
    front = router(router_port, ports, config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router_port}") as ch:
        await until_ok(lambda: gen_grpc.GenerationStub(ch).Generate(REQUEST))
        first_reply = time.perf_counter() - started
        await asyncio.sleep(1.0)  # placement settled and ran
        placement = await adm_grpc.AdminStub(ch).ListModels(adm.AdminListModelsRequest())
    stop.set()
    await asyncio.gather(*watchers)
    return front, {
        "start_to_first_reply_s": first_reply,
        "replica_states_seen": sorted(seen),
        "reloaded": "REPLICA_STATE_LOADING" in seen,
        "ready_after_restart": {m.model: m.ready_replicas for m in placement.models},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    ports, router_port = [free_port() for _ in range(3)], free_port()
    procs = [replica(p, f"r{i}") for i, p in enumerate(ports)]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "router.toml"
        config.write_text(CATALOG)
        front = router(router_port, ports, config)
        try:
            load = await measure_load(ports, router_port)
            scale = await measure_scale_down(router_port, args.clients, args.seconds)
            front, restart = await measure_restart(front, ports, router_port, config)
        finally:
            stop_processes([front, *procs])
    return {"machine": machine_info(), "load": load, "scale_down": scale, "restart": restart}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--seconds", type=float, default=4.0, help="traffic before and after the scale-down"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "admin.json"
    )
    args = parser.parse_args()
    exit_on_sigterm()
    report = asyncio.run(main_async(args))
    load, scale, restart = report["load"], report["scale_down"], report["restart"]
    print(
        f"load bench on one replica: direct {load['direct_load_s']:.3f}s, through Admin "
        f"{load['admin_load_s']:.3f}s (ratio {load['admin_over_direct']:.2f}); first reply "
        f"{load['load_to_first_reply_s'] * 1000:.1f} ms after the admin call returned"
    )
    print(
        f"scale 2 -> 1 under {scale['clients']} streaming clients: {scale['rps_two_replicas']:.1f} "
        f"req/s before, {scale['rps_one_replica']:.1f} after (ratio {scale['one_over_two']:.2f}); "
        f"the call took {scale['scale_down_s']:.2f}s; {scale['requests']} requests, "
        f"{scale['failures']} failed {scale['failure_codes'] or ''}"
    )
    print(
        f"router restart: first reply {restart['start_to_first_reply_s']:.2f}s after start; "
        f"ready replicas {restart['ready_after_restart']}; a replica reloaded: {restart['reloaded']}"
    )
    write_json(args.out, report)


if __name__ == "__main__":
    main()
