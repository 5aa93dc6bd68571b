"""Integration tests: a real router in front of real replicas (tiny CTranslate2 model), loopback."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from conftest import (
    StartReplica,
    StartRouter,
    cancel_after,
    capture_streams,
    collect,
    demo_spec,
    stub,
    wait_routed,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshllm.api.errors import Internal, ResourceExhausted, from_rpc_error
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client.local import free_port
from meshllm.replica.server import ReplicaServer
from meshllm.replica.types import Chunk, GenerationRequest
from meshllm.router import RouterServer

T = TypeVar("T")


def served_by(chunks: list[gen.GenerateChunk]) -> str:
    assert chunks[-1].finish_reason != gen.FINISH_REASON_UNSPECIFIED
    return chunks[-1].timing.replica


def wrap_generate(server: ReplicaServer, wrapper: object) -> None:
    """Replace the replica's generate with ``wrapper(original, request)`` (a test double around
    the real engine path)."""
    assert server.replica is not None
    original = server.replica.generate

    def generate(req: GenerationRequest) -> AsyncIterator[Chunk]:
        return wrapper(original, req)  # type: ignore[operator, no-any-return]

    server.replica.generate = generate  # type: ignore[method-assign]


def slow_down(server: ReplicaServer, per_chunk_s: float) -> None:
    """Make one replica slow, like a busier or weaker GPU: every chunk waits ``per_chunk_s``."""

    async def slow(original: object, req: GenerationRequest) -> AsyncIterator[Chunk]:
        await asyncio.sleep(per_chunk_s)
        async for chunk in original(req):  # type: ignore[operator]
            await asyncio.sleep(per_chunk_s)
            yield chunk

    wrap_generate(server, slow)


async def bounded_gather(calls: list[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run the calls with at most ``limit`` in flight (each starts only when a slot is free)."""
    window = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with window:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


def streamer(
    client: gen_grpc.GenerationStub, i: int, max_tokens: int
) -> Callable[[], Awaitable[list[gen.GenerateChunk]]]:
    """A stream that starts when called (creating the call object already sends the request)."""
    return lambda: collect(client.GenerateStream(request(i, max_tokens=max_tokens)))


async def three(start_replica: StartReplica) -> list[ReplicaServer]:
    return [await start_replica(demo_spec()) for _ in range(3)]


def request(i: int = 0, **fields: object) -> gen.GenerateRequest:
    return gen.GenerateRequest(model="demo", prompt=f"prompt {i}", **fields)  # type: ignore[arg-type]


async def test_concurrent_streams_spread_over_replicas_and_complete(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    replicas = await three(start_replica)
    router = await start_router(*replicas)
    channel, client = stub(router.port)
    async with channel:
        results = await asyncio.gather(
            *(collect(client.GenerateStream(request(i, max_tokens=48))) for i in range(30))
        )
        models = await client.ListModels(gen.ListModelsRequest())
    counts = Counter(served_by(chunks) for chunks in results)
    assert set(counts) == {"r0", "r1", "r2"}, counts
    for chunks in results:  # every reply whole: the tokens streamed are the tokens counted
        assert sum(len(c.token_ids) for c in chunks) == chunks[-1].usage.completion_tokens
        assert chunks[-1].finish_reason in (gen.FINISH_REASON_LENGTH, gen.FINISH_REASON_STOP)
    (info,) = models.models
    assert (info.id, info.engine, info.ready_replicas) == ("demo", "ctranslate2", 3)
    assert info.context_length > 0


async def test_unary_generate_and_request_ids_go_through(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await start_router(demo_replica)
    channel, client = stub(router.port)
    async with channel:
        mine = await client.Generate(request(max_tokens=5, request_id="req-42"))
        made = await client.Generate(request(max_tokens=5))
    assert (mine.request_id, mine.usage.completion_tokens, mine.timing.replica) == (
        "req-42",
        5,
        "r0",
    )
    assert len(made.request_id) == 32  # the router made one and the replica echoed it


async def test_a_slow_replica_gets_fewer_requests_under_least_busy_than_round_robin(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    replicas = await three(start_replica)
    slow_down(replicas[0], per_chunk_s=0.05)
    shares = {}
    for policy in ("round-robin", "least-busy"):
        router = await start_router(*replicas, policy=policy)
        channel, client = stub(router.port)
        async with channel:
            served = await bounded_gather([streamer(client, i, 16) for i in range(36)], limit=6)
        shares[policy] = Counter(served_by(chunks) for chunks in served)["r0"]
    print(f"requests on the slow replica: {shares}")
    assert shares["round-robin"] == 12  # a third, whatever the load
    assert shares["least-busy"] < shares["round-robin"] / 2


async def test_draining_replica_gets_no_new_work(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    replicas = await three(start_replica)
    router = await start_router(*replicas)
    assert replicas[1].replica is not None
    await replicas[1].replica.drain()
    await wait_routed(router, 2)
    channel, client = stub(router.port)
    async with channel:
        results = await asyncio.gather(
            *(collect(client.GenerateStream(request(i, max_tokens=8))) for i in range(12))
        )
    assert Counter(served_by(c) for c in results).keys() == {"r0", "r2"}


async def test_replica_that_stops_is_ejected_and_readmitted_when_back(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    first, second = await start_replica(demo_spec()), await start_replica(demo_spec())
    router = await start_router(first, second)
    port = first.port
    await first.stop(grace_s=0.1)
    await wait_routed(router, 1)
    channel, client = stub(router.port)
    async with channel:
        served = {
            (await client.Generate(request(i, max_tokens=4))).timing.replica for i in range(6)
        }
        assert served == {"r1"}
        back = await start_replica(demo_spec(), port=port, replica_id="back")
        await wait_routed(router, 2, timeout_s=20)
        served = {
            (await client.Generate(request(i, max_tokens=4))).timing.replica for i in range(12)
        }
    assert "back" in served and back.port == port


async def test_failure_before_the_first_token_is_retried_on_another_replica(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    full, ok = await start_replica(demo_spec()), await start_replica(demo_spec())

    async def refuse(original: object, req: GenerationRequest) -> AsyncIterator[Chunk]:
        raise ResourceExhausted("queue full", retry_after=1.0)
        yield  # an async generator, like the real one

    wrap_generate(full, refuse)
    router = await start_router(full, ok, policy="round-robin")
    channel, client = stub(router.port)
    async with channel:
        streams = [await collect(client.GenerateStream(request(i, max_tokens=4))) for i in range(4)]
        unary = [await client.Generate(request(i, max_tokens=4)) for i in range(4)]
    assert {served_by(c) for c in streams} == {"r1"}
    assert {r.timing.replica for r in unary} == {"r1"}
    assert full.replica is not None and ok.replica is not None


async def test_every_replica_refusing_returns_the_replicas_error(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    async def refuse(original: object, req: GenerationRequest) -> AsyncIterator[Chunk]:
        raise ResourceExhausted("queue full", retry_after=2.5)
        yield

    wrap_generate(demo_replica, refuse)
    router = await start_router(demo_replica)
    channel, client = stub(router.port)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(client.GenerateStream(request(max_tokens=4)))
    error = from_rpc_error(e.value)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after == 2.5


async def test_failure_after_the_first_token_ends_the_stream_with_unavailable(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    async def break_midway(original: object, req: GenerationRequest) -> AsyncIterator[Chunk]:
        count = 0
        async for chunk in original(req):  # type: ignore[operator]
            yield chunk
            count += 1
            if count == 2:
                raise Internal("engine crashed")

    wrap_generate(demo_replica, break_midway)
    router = await start_router(demo_replica)
    channel, client = stub(router.port)
    received: list[gen.GenerateChunk] = []
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for chunk in client.GenerateStream(
                request(max_tokens=200, stream_options=gen.StreamOptions(coalesce_tokens=1))
            ):
                received.append(chunk)
    error = from_rpc_error(e.value)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "STREAM_INTERRUPTED" and "incomplete" in error.message
    assert error.metadata["replica"] == "r0"
    assert len(received) == 2 and all(
        c.finish_reason == gen.FINISH_REASON_UNSPECIFIED for c in received
    )


async def test_bad_requests_get_clear_statuses(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await start_router(demo_replica)
    channel, client = stub(router.port)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await client.Generate(gen.GenerateRequest(model="nope", prompt="x"))
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await client.Generate(gen.GenerateRequest(prompt="x"))
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await collect(client.GenerateStream(request(temperature=-1.0)))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "demo" in (unknown.value.details() or "")  # names what is available
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # the replica's answer, passed on
    assert [v.field for v in from_rpc_error(bad.value).field_violations] == ["temperature"]


async def test_no_healthy_replica_is_unavailable_with_retry_info(
    start_router: StartRouter, tmp_path: Path
) -> None:
    router = await start_router(f"127.0.0.1:{free_port()}", ready=0, retry_after_s=3.0)
    channel, client = stub(router.port)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.Generate(request(max_tokens=4))
        listed = await client.ListModels(gen.ListModelsRequest())
    error = from_rpc_error(e.value)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (error.reason, error.retry_after) == ("NO_HEALTHY_REPLICA", 3.0)
    assert list(listed.models) == []


async def test_client_cancel_stops_generation_on_the_replica(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    server = await start_replica(demo_spec(id="bench", path="bench"))
    streams = capture_streams(server)
    router = await start_router(server)
    received = await cancel_after(
        router.port, gen.GenerateRequest(model="bench", prompt="long", max_tokens=2000), tokens=5
    )
    (stream,) = streams
    assert stream.cancelled and stream.produced < 2000
    print(f"tokens produced after the cancel: {stream.produced - received}")
    # Without the cancel reaching the engine it would run to 2000 (about 0.4 s); the bound leaves
    # room for the chunks in transit through two hops on a loaded 2-core machine.
    assert stream.produced - received < 300
    assert server.replica is not None and server.replica.load_report().running == 0
    assert all(r.inflight == 0 for r in router.registry.replicas.values())


async def test_deadline_expiry_returns_deadline_exceeded_and_stops_the_replica(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    server = await start_replica(demo_spec(engine="fake", options={"token_delay_ms": "5"}))
    streams = capture_streams(server)
    router = await start_router(server)
    channel, client = stub(router.port)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(client.GenerateStream(request(max_tokens=2000), timeout=0.3))
        await asyncio.sleep(0.2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    (stream,) = streams
    assert stream.cancelled and stream.done and stream.generated < 200


async def test_dns_name_and_replicas_file_are_followed(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    a, b = await start_replica(demo_spec()), await start_replica(demo_spec())
    by_dns = await start_router(dns=f"localhost:{a.port}", ready=1, refresh_s=0.1)
    assert {r.replica_id for r in by_dns.registry.replicas.values() if r.connected} == {"r0"}
    listing = tmp_path / "replicas"
    listing.write_text(f"127.0.0.1:{a.port}\n")
    by_file: RouterServer = await start_router(replicas_file=str(listing), ready=1, refresh_s=0.1)
    listing.write_text(f"127.0.0.1:{a.port}\n127.0.0.1:{b.port}\n")
    await wait_routed(by_file, 2)
    listing.write_text(f"127.0.0.1:{b.port}\n")
    await wait_routed(by_file, 1)
    assert [r.replica_id for r in by_file.registry.replicas.values()] == ["r1"]


async def test_generation_health_follows_the_replicas(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await start_router(demo_replica)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    health = health_pb2_grpc.HealthStub(channel)

    async def status(service: str) -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status  # type: ignore[no-any-return]

    async with channel:
        assert await status("meshllm.api.v1.Generation") == health_pb2.HealthCheckResponse.SERVING
        assert demo_replica.replica is not None
        await demo_replica.replica.drain()
        await wait_routed(router, 0)
        await asyncio.sleep(0.05)
        assert (
            await status("meshllm.api.v1.Generation") == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        assert (
            await status("") == health_pb2.HealthCheckResponse.SERVING
        )  # the router itself is fine
