"""Shared fixtures: the generated tiny models and real replica servers on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.replica.config import ModelSpec, ReplicaConfig
from meshllm.replica.models.tiny import DEMO, ensure_model
from meshllm.replica.server import ReplicaServer

StartReplica = Callable[..., Awaitable[ReplicaServer]]


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every replica subprocess) builds models into one temporary cache."""
    cache = tmp_path_factory.mktemp("meshllm-cache")
    os.environ["MESHLLM_CACHE_DIR"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def demo_dir(model_cache: Path) -> Path:
    return ensure_model(DEMO)


def demo_spec(**overrides: object) -> ModelSpec:
    fields: dict[str, object] = {"id": "demo", "path": "demo", **overrides}
    return ModelSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def start_replica(demo_dir: Path) -> AsyncIterator[StartReplica]:
    """Start real in-process replica servers on 127.0.0.1:0; all are stopped after the test."""
    servers: list[ReplicaServer] = []

    async def start(
        spec: ModelSpec | None = None, wait_ready: bool = True, **config: object
    ) -> ReplicaServer:
        cfg = ReplicaConfig(host="127.0.0.1", port=0, model=spec, replica_id=f"r{len(servers)}",
                            drain_grace_s=2.0, **config)  # type: ignore[arg-type]  # fmt: skip
        server = ReplicaServer(cfg)
        await server.start()
        servers.append(server)
        if spec is not None and wait_ready:
            assert server.replica is not None
            await server.replica.load(spec, wait=True)
            assert server.replica.state.value == "ready", server.replica.error
        return server

    yield start
    for server in servers:
        await server.stop(grace_s=0.5)


@pytest.fixture
async def demo_replica(start_replica: StartReplica) -> ReplicaServer:
    return await start_replica(demo_spec())


def stub(port: int) -> tuple[grpc.aio.Channel, gen_grpc.GenerationStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return channel, gen_grpc.GenerationStub(channel)


async def collect(
    stream: grpc.aio.UnaryStreamCall[gen.GenerateRequest, gen.GenerateChunk],
) -> list[gen.GenerateChunk]:
    return [c async for c in stream]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def replica_process(
    model_cache: Path,
) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], int]]]:
    """Start ``meshllm-replica`` as a real child process; killed after the test if still running."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "meshllm.replica",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ]
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        procs.append(proc)
        wait_serving(port, proc)
        return proc, port

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_serving(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until the replica lists a model (blocking; for subprocess tests)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        list_models = gen_grpc.GenerationStub(channel).ListModels
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"replica exited with {proc.returncode}"
            try:
                if list_models(gen.ListModelsRequest(), timeout=1.0).models:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"replica on port {port} not serving after {timeout_s}s")
