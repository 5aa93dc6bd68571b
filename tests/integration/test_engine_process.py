"""The engine in its own process: what holds when it is killed, unloaded or reloaded.

Real replicas on loopback with a real engine process (the fake engine, slowed down, so that
requests are surely in flight or queued when the process is killed).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import grpc
import psutil
import pytest
from conftest import StartReplica, StartRouter, capture_streams, demo_spec, stub

from meshllm.api.errors import from_rpc_error
from meshllm.api.types import ReplicaState
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.replica.engines.process import ProcessEngine
from meshllm.replica.server import ReplicaServer

SLOW = demo_spec(engine="fake", max_batch_size=2, inter_threads=1, options={"token_delay_ms": "20"})


def engine_of(server: ReplicaServer) -> ProcessEngine:
    assert server.replica is not None and server.replica.model is not None
    engine = server.replica.model.engine
    assert isinstance(engine, ProcessEngine)
    return engine


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110 (the engine process reports; nothing here to wait on)
            await asyncio.sleep(0.02)


async def stream_until_error(
    client: gen_grpc.GenerationStub, prompt: str, first: asyncio.Event | None = None
) -> tuple[int, grpc.aio.AioRpcError | None]:
    """Tokens received, and the error that ended the stream (None: it ended normally)."""
    received = 0
    call = client.GenerateStream(gen.GenerateRequest(model="demo", prompt=prompt, max_tokens=500))
    try:
        async for chunk in call:
            received += len(chunk.token_ids)
            if first is not None and received:
                first.set()
    except grpc.aio.AioRpcError as e:
        return received, e
    return received, None


async def test_a_killed_engine_fails_its_requests_clearly_and_a_reload_starts_a_new_one(
    start_replica: StartReplica,
) -> None:
    server = await start_replica(SLOW)
    old = engine_of(server)
    assert old.pid != os.getpid() and psutil.pid_exists(old.pid)
    channel, client = stub(server.port)
    async with channel:
        first = asyncio.Event()
        # two run (max batch 2, one worker), two wait in the engine's queue
        calls = [asyncio.create_task(stream_until_error(client, f"p{i}", first)) for i in range(4)]
        await first.wait()
        await until(lambda: old.stats().queued == 2)
        os.kill(old.pid, signal.SIGKILL)
        results = await asyncio.gather(*calls)
    errors = [from_rpc_error(e) for _, e in results if e is not None]
    assert len(errors) == 4  # nothing cut short looks complete
    cut = [e for (received, _), e in zip(results, errors, strict=True) if received]
    waiting = [e for (received, _), e in zip(results, errors, strict=True) if not received]
    assert len(cut) == 2 and len(waiting) == 2
    assert {(e.code, e.reason) for e in cut} == {
        (grpc.StatusCode.UNAVAILABLE, "STREAM_INTERRUPTED")
    }
    # before their first token: UNAVAILABLE with a reason, which the router retries elsewhere
    assert {(e.code, e.reason) for e in waiting} == {(grpc.StatusCode.UNAVAILABLE, "ENGINE_DIED")}
    replica = server.replica
    assert replica is not None
    await until(lambda: replica.state == ReplicaState.FAILED)
    assert f"engine process {old.pid} exited with code -9" in replica.error

    await replica.load(SLOW, wait=True)
    assert replica.state == ReplicaState.READY
    new = engine_of(server)
    assert new.pid != old.pid
    channel, client = stub(server.port)
    async with channel:
        reply = await client.Generate(gen.GenerateRequest(model="demo", prompt="abc", max_tokens=3))
    assert reply.usage.completion_tokens == 3


async def test_unload_ends_the_engine_process_and_its_memory(start_replica: StartReplica) -> None:
    server = await start_replica(demo_spec())
    engine = engine_of(server)
    process = psutil.Process(engine.pid)
    assert process.memory_info().rss > 20 * 2**20  # the model lives there, not in the front
    assert server.replica is not None
    memory = server.replica.status().memory
    assert memory is not None and memory.source == "process"
    assert memory.used_bytes > process.memory_info().rss  # the report counts both processes
    await server.replica.unload(drain_timeout_s=1.0)
    assert server.replica.state == ReplicaState.EMPTY
    assert not psutil.pid_exists(engine.pid) or process.status() == psutil.STATUS_ZOMBIE


async def test_a_load_that_fails_in_the_engine_process_says_why(
    start_replica: StartReplica,
) -> None:
    server = await start_replica(None)
    assert server.replica is not None
    await server.replica.load(demo_spec(engine="fake", options={"token_delay_ms": "x"}), wait=True)
    assert server.replica.state == ReplicaState.FAILED
    assert "token_delay_ms" in server.replica.error or "could not convert" in server.replica.error


async def test_the_router_retries_requests_a_dying_engine_had_not_started(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    a = await start_replica(SLOW)
    b = await start_replica(SLOW)
    # replica_queue: requests wait in the replicas' queues (not the router's), for the engine to hold
    router = await start_router(a, b, policy="round-robin", replica_queue=8)
    doomed = engine_of(a)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        client = gen_grpc.GenerationStub(channel)
        calls = [
            asyncio.ensure_future(
                client.Generate(gen.GenerateRequest(model="demo", prompt=f"q{i}", max_tokens=20))
            )
            for i in range(8)
        ]
        await until(lambda: doomed.stats().queued >= 1)
        os.kill(doomed.pid, signal.SIGKILL)
        results = await asyncio.gather(*calls, return_exceptions=True)
    done = [r for r in results if isinstance(r, gen.GenerateResponse)]
    failed = [from_rpc_error(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    # unary: nothing reached the client, so every request the dead engine held is retried on b
    assert failed == [] and len(done) == 8
    assert {r.timing.replica for r in done} <= {"r0", "r1"} and "r1" in {
        r.timing.replica for r in done
    }


@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "engine-process"])
async def test_cancellation_reaches_the_engine_in_either_mode(
    start_replica: StartReplica, in_process: bool
) -> None:
    server = await start_replica(
        demo_spec(engine="fake", options={"token_delay_ms": "5"}), engine_process=not in_process
    )
    assert server.replica is not None and server.replica.model is not None
    engine = server.replica.model.engine
    streams = capture_streams(server)
    received = 0
    channel, client = stub(server.port)
    async with channel:
        call = client.GenerateStream(gen.GenerateRequest(model="demo", prompt="x", max_tokens=2000))
        async for chunk in call:
            received += len(chunk.token_ids)
            if received >= 5:
                break
        call.cancel()
    await until(lambda: engine.stats().running == 0 and engine.stats().queued == 0, 5.0)
    (stream,) = streams
    # one token per 5 ms: the engine stops within a few tokens of the client's cancel
    assert stream.produced - received < 20, stream.produced - received
