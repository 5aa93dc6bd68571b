"""Shared fixtures: the generated tiny models and real replica servers on loopback."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from meshllm.api.errors import MeshError, from_rpc_error
from meshllm.api.spec import ModelSpec
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client.local import free_port
from meshllm.replica.config import ReplicaConfig
from meshllm.replica.engines import TokenStream
from meshllm.replica.models import smollm2
from meshllm.replica.models.tiny import DEMO, ensure_model
from meshllm.replica.models.tiny_llama import ensure_tiny_llama
from meshllm.replica.server import ReplicaServer
from meshllm.replica.settings import cache_dir
from meshllm.router import RouterConfig, RouterServer
from meshllm.router.tenants import hash_key

USER_CACHE = cache_dir()
"""The cache ``make setup`` prepared the real model in (read before the tests switch to a
temporary one): converting SmolLM2 takes half a minute, so the tests reuse that folder."""

TIERS = {"unit": "unit", "integration": "integration", "e2e": "e2e"}
"""Test folders by cost: ``unit`` (no servers, no processes), ``integration`` (real gRPC servers
in process, real models, real Redis), ``e2e`` (real processes, the chart's security scan). Each
test is marked with its folder's name; ``e2e`` tests are also ``slow``."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = TIERS.get(item.path.parent.name)
        if tier is not None:
            item.add_marker(tier)
            if tier == "e2e":
                item.add_marker("slow")


StartReplica = Callable[..., Awaitable[ReplicaServer]]
StartRouter = Callable[..., Awaitable[RouterServer]]


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every replica subprocess) builds models into one temporary cache."""
    cache = tmp_path_factory.mktemp("meshllm-cache")
    os.environ["MESHLLM_CACHE_DIR"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def smollm2_dir(model_cache: Path) -> Path:
    """The real SmolLM2-135M-Instruct (int8) that ``make setup`` prepared, linked into the
    tests' cache so replicas asked for ``smollm2`` (in process or not) find it; never skipped."""
    try:
        prepared = smollm2.ensure_model(root=USER_CACHE)
    except MeshError as e:
        pytest.fail(f"{e.message}: the real-model tests need `make setup` first")
    link = model_cache / "models" / prepared.name
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(prepared)
    return prepared


@pytest.fixture(scope="session")
def smollm2_float32_dir(smollm2_dir: Path) -> Path:
    """SmolLM2 converted to float32 from the same wheel (once per machine: ~40 s, 540 MB)."""
    return smollm2.ensure_model(quantization="float32", root=USER_CACHE)


@pytest.fixture(scope="session")
def demo_dir(model_cache: Path) -> Path:
    return ensure_model(DEMO)


@pytest.fixture(scope="session")
def tiny_llama_dir(model_cache: Path) -> Path:
    """The tiny FP16 Llama folder (Hugging Face layout) the exllamav3 engine loads."""
    return ensure_tiny_llama()


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
        settings = {
            "host": "127.0.0.1",
            "port": 0,
            "replica_id": f"r{len(servers)}",
            "drain_grace_s": 2.0,
            **config,
        }
        cfg = ReplicaConfig(model=spec, **settings)  # type: ignore[arg-type]
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


@pytest.fixture
async def start_router(start_replica: StartReplica) -> AsyncIterator[StartRouter]:
    """Start real in-process routers on 127.0.0.1:0 in front of the given replicas (servers or
    addresses); each waits until ``ready`` replicas (default: all) report READY to it."""
    routers: list[RouterServer] = []

    async def start(
        *replicas: ReplicaServer | str, ready: int | None = None, **config: object
    ) -> RouterServer:
        addresses = tuple(r if isinstance(r, str) else f"127.0.0.1:{r.port}" for r in replicas)
        settings: dict[str, object] = {
            "host": "127.0.0.1",
            "port": 0,
            "replicas": addresses,
            "auth": "none",
            "drain_grace_s": 1.0,
            "report_interval_ms": 50,
            **config,
        }
        router = RouterServer(RouterConfig.from_flat(settings))
        await router.start()
        routers.append(router)
        await wait_routed(router, len(addresses) if ready is None else ready)
        return router

    yield start
    for router in routers:
        await router.stop(grace_s=0.5)


async def wait_routed(router: RouterServer, count: int, timeout_s: float = 15.0) -> None:
    """Wait until exactly ``count`` replicas take work through ``router``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sum(len(r) for r in router.registry.ready_models().values()) == count:
            return
        await asyncio.sleep(0.02)
    state = {
        r.address: (r.state.value, r.connected, r.last_error)
        for r in router.registry.replicas.values()
    }
    raise TimeoutError(f"router does not see {count} ready replicas: {state}")


def stub(port: int) -> tuple[grpc.aio.Channel, gen_grpc.GenerationStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return channel, gen_grpc.GenerationStub(channel)


async def collect(
    stream: grpc.aio.UnaryStreamCall[gen.GenerateRequest, gen.GenerateChunk],
) -> list[gen.GenerateChunk]:
    return [c async for c in stream]


async def cancel_after(port: int, request: gen.GenerateRequest, tokens: int) -> int:
    """Stream ``request`` from the server on ``port``, cancel once ``tokens`` arrived, wait 0.5 s
    for the engine to notice; returns the tokens received."""
    channel, client = stub(port)
    async with channel:
        call = client.GenerateStream(request)
        received = 0
        async for chunk in call:
            received += len(chunk.token_ids)
            if received >= tokens:
                break
        call.cancel()
        await asyncio.sleep(0.5)
    return received


StartProcess = Callable[..., tuple[subprocess.Popen[bytes], int]]


@pytest.fixture
def processes(model_cache: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], int]]]:
    """Start ``python -m <module> --host 127.0.0.1 --port <free> ...`` as real child processes
    and wait until each lists a model; all are killed after the test if still running."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(module: str, *args: str, wait: bool = True) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args]
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        procs.append(proc)
        if wait:
            wait_serving(port, proc)
        return proc, port

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def replica_process(processes: StartProcess) -> StartProcess:
    """Start ``meshllm-replica`` as a real child process."""
    return functools.partial(processes, "meshllm.replica")


@pytest.fixture
def router_process(processes: StartProcess) -> StartProcess:
    """Start ``meshllm-router`` as a real child process (it waits until a replica is routed)."""
    return functools.partial(processes, "meshllm.router", "--report-interval-ms", "50", "--no-auth")


def wait_serving(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    """Wait until the server (replica or router) lists a model (blocking; for subprocess tests)."""
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
    raise TimeoutError(f"server on port {port} not serving after {timeout_s}s")


# -- Redis (Debian's redis-server, a real one per test) ------------------------------------------


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: `make setup` installs Debian's package"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


# -- shared by several test modules --------------------------------------------------------

USER, ADMIN = "user-key-1", "admin-key-1"


def tenants_file(tmp_path: Path, **limits: int) -> str:
    """A user tenant ``batch`` with ``limits`` and an unlimited admin tenant ``ops``."""
    lines = "".join(f"{name} = {value}\n" for name, value in limits.items())
    path = tmp_path / "tenants.toml"
    path.write_text(
        f'[[tenants]]\nname = "batch"\nkeys = ["{hash_key(USER)}"]\n{lines}\n'
        f'[[tenants]]\nname = "ops"\nrole = "admin"\nkeys = ["{hash_key(ADMIN)}"]\n'
    )
    return str(path)


async def keyed_router(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path, **limits: int
) -> RouterServer:
    """A router that needs API keys (the ``tenants_file`` tenants, with ``limits``) in front of
    one demo replica."""
    return await start_router(
        await start_replica(demo_spec()),
        auth="api-key",
        tenants_file=tenants_file(tmp_path, **limits),
    )


async def one_slot_router(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> RouterServer:
    """A keyed router whose tenant may run one request at a time, a refused one told to come
    back in 0.3 s (RetryInfo), in front of a slow fake replica (5 ms a token)."""
    return await start_router(
        await start_replica(demo_spec(engine="fake", options={"token_delay_ms": "5"})),
        auth="api-key",
        tenants_file=tenants_file(tmp_path, concurrent_requests=1),
        retry_after_s=0.3,
    )


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


async def generate(
    router: RouterServer, key: str = USER, max_tokens: int = 2, **fields: object
) -> tuple[gen.GenerateResponse | MeshError, dict[str, str]]:
    """One Generate call: the response (or the error) and the initial metadata."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        call = gen_grpc.GenerationStub(channel).Generate(
            gen.GenerateRequest(model="demo", prompt="hello", max_tokens=max_tokens, **fields),  # type: ignore[arg-type]
            metadata=bearer(key),
        )
        try:
            response: gen.GenerateResponse = await call
        except grpc.aio.AioRpcError as e:
            return from_rpc_error(e), {}
        headers = {k: v for k, v in await call.initial_metadata() if isinstance(v, str)}
        return response, headers


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return text


DAY = 86_400.0


class Clock:
    def __init__(self, now: float = 1_000 * DAY) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def capture_streams(server: ReplicaServer) -> list[TokenStream]:
    """Record the engine-side stream of every request, to count tokens the engine produced."""
    assert server.replica is not None and server.replica.model is not None
    engine = server.replica.model.engine
    streams: list[TokenStream] = []
    submit = engine.submit

    def recording_submit(*args: object) -> TokenStream:
        s = submit(*args)  # type: ignore[arg-type]
        streams.append(s)
        return s

    engine.submit = recording_submit  # type: ignore[method-assign,assignment]
    return streams
