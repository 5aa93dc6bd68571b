"""Outlier ejection through a real router and real replicas (tiny CTranslate2 model), loopback.

One replica is made to fail every request fast, as a replica with a broken CUDA context does:
its generate raises the INTERNAL the replica's own engine-failure path raises, while its load
reports go on saying READY with an empty queue (the test double is ``FailingGenerate``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import StartReplica, StartRouter, collect, demo_spec, scrape, stub

from meshllm.api.errors import Internal
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.replica.server import ReplicaServer
from meshllm.replica.types import Chunk, GenerationRequest
from meshllm.router import RouterServer
from meshllm.router.registry import Replica


class FailingGenerate:
    """Test double: the replica's generate fails at once with INTERNAL while ``failing``;
    ``attempts`` holds the (monotonic) time of every request that reached it."""

    def __init__(self, server: ReplicaServer) -> None:
        assert server.replica is not None
        self._original = server.replica.generate
        self.failing = True
        self.attempts: list[float] = []
        server.replica.generate = self._generate  # type: ignore[method-assign]

    def _generate(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        self.attempts.append(time.monotonic())
        return self._fail() if self.failing else self._original(req)

    async def _fail(self) -> AsyncIterator[Chunk]:
        raise Internal("engine failed: RuntimeError: CUDA error: an illegal memory access")
        yield  # an async generator, like the real one


def request(i: int) -> gen.GenerateRequest:
    return gen.GenerateRequest(model="demo", prompt=f"prompt {i}", max_tokens=4)


async def served_by(router: RouterServer, count: int) -> list[str]:
    """``count`` streams one after another; each must end with a final chunk (no error)."""
    channel, client = stub(router.port)
    async with channel:
        replies = [await collect(client.GenerateStream(request(i))) for i in range(count)]
    assert all(r[-1].finish_reason != gen.FINISH_REASON_UNSPECIFIED for r in replies)
    return [r[-1].timing.replica for r in replies]


async def replica_error(router: RouterServer, name: str) -> str:
    channel, _ = stub(router.port)
    async with channel:
        reply = await adm_grpc.AdminStub(channel).ListReplicas(adm.ListReplicasRequest())
    (status,) = [r for r in reply.replicas if r.replica_id == name]
    error: str = status.error
    return error


def sample(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found is not None, name
    return float(found.group(1))


async def ended(replica: Replica) -> None:
    """Sleep until the replica's current ejection is over."""
    ejection = replica.outlier.ejection
    assert ejection is not None
    await asyncio.sleep(max(ejection.until - time.monotonic(), 0.0) + 0.05)


async def test_a_replica_failing_fast_is_ejected_while_requests_succeed_and_comes_back(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    servers = [await start_replica(demo_spec()) for _ in range(3)]
    double = FailingGenerate(servers[0])
    router = await start_router(
        *servers, outlier_base_ejection_s=3.0, outlier_ramp_s=3.0, metrics_port=0
    )
    (r0,) = [r for r in router.registry.replicas.values() if r.name == "r0"]

    # Least-busy sees an idle replica; without ejection it would get a third of first picks.
    served = await served_by(router, 60)  # every request succeeds: retried before a token
    assert "r0" not in served and {"r1", "r2"} == set(served)
    first = r0.outlier.ejection
    assert first is not None and first.count == 1 and first.duration_s == 3.0
    start = first.until - first.duration_s
    assert len([t for t in double.attempts if t <= start]) == 5  # 5 in a row ejected it
    assert not [t for t in double.attempts if start < t < first.until]  # then none at all
    note = await replica_error(router, "r0")
    assert note.startswith("ejected as an outlier for ") and "5 attempts failed in a row" in note
    text = await asyncio.to_thread(scrape, router.metrics_port or 0)
    assert sample(text, 'meshllm_router_outlier_ejections_total{replica="r0"}') == 1.0
    assert sample(text, 'meshllm_router_replicas_ejected{model="demo"}') == 1.0

    # Still failing when it comes back: one failure in its ramp ejects it again, for longer.
    await ended(r0)
    before, served = len(double.attempts), []
    while r0.outlier.ejection is first and len(served) < 300:  # until the ramp admits it
        served += await served_by(router, 1)
    assert "r0" not in served and len(double.attempts) == before + 1
    second = r0.outlier.ejection
    assert second is not None and (second.count, second.duration_s) == (2, 6.0)
    assert "re-admission ramp" in second.why

    # Healed: after the backoff it takes requests again.
    double.failing = False
    await ended(r0)
    await asyncio.sleep(3.0)  # the ramp
    served = await served_by(router, 30)
    assert "r0" in served
    assert r0.outlier.ejections == 0  # a clean ramp resets the count
    assert await replica_error(router, "r0") == ""
    text = await asyncio.to_thread(scrape, router.metrics_port or 0)
    assert sample(text, 'meshllm_router_outlier_ejections_total{replica="r0"}') == 2.0
    assert sample(text, 'meshllm_router_replicas_ejected{model="demo"}') == 0.0


async def test_without_outlier_ejection_the_failing_replica_keeps_taking_first_picks(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    servers = [await start_replica(demo_spec()) for _ in range(3)]
    double = FailingGenerate(servers[0])
    router = await start_router(*servers, outlier_ejection=False)
    served = await served_by(router, 60)
    assert "r0" not in served  # the forwarder's retries hide it from clients...
    assert len(double.attempts) > 10  # ...but it gets about a third of first attempts
    assert router.registry.outliers is None


async def test_the_last_replica_of_a_model_is_never_ejected(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    servers = [await start_replica(demo_spec()) for _ in range(2)]
    doubles = [FailingGenerate(s) for s in servers]
    router = await start_router(*servers, outlier_max_ejected_percent=100)
    channel, client = stub(router.port)
    async with channel:
        for i in range(20):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(client.GenerateStream(request(i)))
            assert e.value.code() == grpc.StatusCode.INTERNAL  # the replica's own error
    now = time.monotonic()
    ejected = [r for r in router.registry.replicas.values() if r.outlier.ejected(now)]
    assert len(ejected) == 1  # the other is the last one: it stays in, failing
    assert len(router.registry.candidates("demo")) == 1
    assert sum(len(d.attempts) for d in doubles) > 20  # retried on the other before that
