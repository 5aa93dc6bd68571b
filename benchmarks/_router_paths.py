"""The paths to a replica that parts (a) and (b) of benchmarks/router.py compare (direct, through
a bare pass-through relay, through the router) and the tally each path collects."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from benchmarks._common import (
    Process,
    RequestRecord,
    closed_loop,
    cpu_seconds,
    prompt_texts,
    stop_processes,
)
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc

HOP_FLAG = "--serve-pass-through"
"""benchmarks/router.py with this flag serves the pass-through relay instead of benchmarking."""
FRONT_NAMES = ("router", "pass-through", "least-busy", "round-robin")
"""Process names of the servers in front of replicas (see :func:`stop_servers`)."""

# -- pass-through relay (the floor of one Python gRPC hop) --------------------------------------

Context = grpc.aio.ServicerContext[Any, Any]


class PassThrough(gen_grpc.GenerationServicer):
    """Relays GenerateStream and ListModels to one replica: no routing, no leases, no retries."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub

    async def GenerateStream(
        self, request: gen.GenerateRequest, context: Context
    ) -> AsyncIterator[gen.GenerateChunk]:
        async for chunk in self._stub.GenerateStream(request):
            yield chunk

    async def ListModels(
        self, request: gen.ListModelsRequest, context: Context
    ) -> gen.ListModelsResponse:
        reply: gen.ListModelsResponse = await self._stub.ListModels(request)
        return reply


async def serve_pass_through(port: int, target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        gen_grpc.add_GenerationServicer_to_server(
            PassThrough(gen_grpc.GenerationStub(channel)), server
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()


def pass_through_args(port: int, replica_port: int) -> list[str]:
    """The relay as a process: benchmarks/router.py run with :data:`HOP_FLAG`."""
    script = str(Path(__file__).resolve().with_name("router.py"))
    return [sys.executable, script, HOP_FLAG, str(port), f"127.0.0.1:{replica_port}"]


def stop_servers(procs: Mapping[str, Process]) -> None:
    """Routers and proxies first, so they do not log their replicas going away; then replicas."""
    front = [p for name, p in procs.items() if name in FRONT_NAMES]
    stop_processes(front)
    stop_processes([p for p in procs.values() if p not in front])


# -- one path and its tally ---------------------------------------------------------------------


@dataclass
class Endpoint:
    """One way to reach the replica (direct, through a proxy or a router) and its tally."""

    name: str
    port: int
    stub: Any = None
    records: list[RequestRecord] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    round_values: list[float] = field(default_factory=list)


def requests_for(model: str, count: int, max_tokens: int) -> list[gen.GenerateRequest]:
    texts = prompt_texts(count)
    return [
        gen.GenerateRequest(model=model, prompt=t, temperature=0.0, max_tokens=max_tokens)
        for t in texts
    ]


async def timed_phase(
    ep: Endpoint,
    requests: Sequence[gen.GenerateRequest],
    seconds: float,
    procs: Mapping[str, Process],
) -> tuple[list[RequestRecord], float]:
    """A closed-loop phase on ``ep``; its records, wall time and CPU time go to ep's tally."""
    before = cpu_seconds(procs)
    records, wall = await closed_loop(ep.stub, requests, seconds)
    after = cpu_seconds(procs)
    ep.records.extend(records)
    ep.wall_s += wall
    for name, value in after.items():
        ep.cpu_s[name] = ep.cpu_s.get(name, 0.0) + value - before[name]
    return records, wall


def rotated(items: Sequence[Endpoint], turn: int) -> list[Endpoint]:
    """The paths in the order of round ``turn``: each round starts one path later."""
    k = turn % len(items)
    return [*items[k:], *items[:k]]


def cpu_ms_per_request(ep: Endpoint) -> dict[str, float]:
    return {k: v * 1e3 / max(1, len(ep.records)) for k, v in ep.cpu_s.items()}


def chunks_per_request(ep: Endpoint) -> float:
    return sum(r.chunks for r in ep.records) / max(1, len(ep.records))


def cores_busy(ep: Endpoint) -> dict[str, float]:
    return {k: v / ep.wall_s for k, v in ep.cpu_s.items()} if ep.wall_s else {}
