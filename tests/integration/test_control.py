"""ReplicaControl and health on a real replica: load, unload, failure reasons, load reports."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import StartReplica, demo_spec, stub
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshllm.api.convert import spec_to_pb
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.api.v1 import replica_control_pb2_grpc as rc_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


GENERATION = health_pb2.HealthCheckRequest(service="meshllm.api.v1.Generation")
CONTROL = health_pb2.HealthCheckRequest(service="meshllm.api.v1.ReplicaControl")


async def test_load_serve_unload_with_health_following_state(start_replica: StartReplica) -> None:
    server = await start_replica(None)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        control = rc_grpc.ReplicaControlStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        # an idle worker is alive and placeable (overall, ReplicaControl) but serves no model
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING
        assert (await health.Check(CONTROL)).status == SERVING
        assert (await health.Check(GENERATION)).status == NOT_SERVING
        assert (await control.GetStatus(rc.GetStatusRequest())).state == rc.REPLICA_STATE_EMPTY
        with pytest.raises(grpc.aio.AioRpcError) as nothing:
            await control.Drain(rc.DrainRequest())
        assert nothing.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        status = await control.LoadModel(
            rc.LoadModelRequest(spec=spec_to_pb(demo_spec()), wait=True)
        )
        assert status.state == rc.REPLICA_STATE_READY
        assert status.spec.id == "demo" and status.memory.used_bytes > 0
        assert (await health.Check(GENERATION)).status == SERVING
        again = await control.LoadModel(
            rc.LoadModelRequest(spec=spec_to_pb(demo_spec()), wait=True)
        )
        assert again.state == rc.REPLICA_STATE_READY  # idempotent

        other = spec_to_pb(demo_spec(id="other"))
        try:
            await control.LoadModel(rc.LoadModelRequest(spec=other, wait=True))
            raise AssertionError("loading a second model must fail")
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION

        generation = gen.GenerateRequest(model="demo", prompt="x", max_tokens=400, temperature=0.0)
        in_flight = asyncio.ensure_future(stub(server.port)[1].Generate(generation))
        await asyncio.sleep(0.05)
        unloaded = await control.UnloadModel(rc.UnloadModelRequest(drain_timeout_s=10))
        assert unloaded.state == rc.REPLICA_STATE_EMPTY
        assert (await in_flight).usage.completion_tokens == 400  # drained, not dropped
        assert (await health.Check(GENERATION)).status == NOT_SERVING
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == SERVING


async def test_drain_keeps_the_model_and_undrain_admits_again(start_replica: StartReplica) -> None:
    server = await start_replica(demo_spec())
    channel, client = stub(server.port)
    async with channel:
        control = rc_grpc.ReplicaControlStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        request = gen.GenerateRequest(model="demo", prompt="x", max_tokens=300, temperature=0.0)
        in_flight = asyncio.ensure_future(client.Generate(request))
        await asyncio.sleep(0.05)
        drained = await control.Drain(rc.DrainRequest())
        assert drained.state == rc.REPLICA_STATE_DRAINING and drained.spec.id == "demo"
        assert (await control.Drain(rc.DrainRequest())).state == rc.REPLICA_STATE_DRAINING
        assert (await health.Check(GENERATION)).status == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.Generate(request)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (await in_flight).usage.completion_tokens == 300  # in-flight work goes on

        assert (await control.Undrain(rc.UndrainRequest())).state == rc.REPLICA_STATE_READY
        assert (await control.Undrain(rc.UndrainRequest())).state == rc.REPLICA_STATE_READY
        assert (await client.Generate(request)).usage.completion_tokens == 300
        assert (await health.Check(GENERATION)).status == SERVING


@pytest.mark.parametrize(
    ("spec", "reason_parts"),
    [
        (rc.ModelSpec(id="m", path="/does/not/exist", engine="ctranslate2"), ["/does/not/exist"]),
        (
            rc.ModelSpec(id="m", path="demo", engine="vllm"),
            ["ctranslate2", "vllm"],
        ),  # names known engines
    ],
    ids=["bad-path", "unknown-engine"],
)
async def test_failed_load_reports_the_reason_and_leaves_the_replica_loadable(
    start_replica: StartReplica, spec: rc.ModelSpec, reason_parts: list[str]
) -> None:
    server = await start_replica(None)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        control = rc_grpc.ReplicaControlStub(channel)
        status = await control.LoadModel(rc.LoadModelRequest(spec=spec, wait=True))
        assert status.state == rc.REPLICA_STATE_FAILED
        for part in reason_parts:
            assert part in status.error
        recovered = await control.LoadModel(
            rc.LoadModelRequest(spec=spec_to_pb(demo_spec()), wait=True)
        )
        assert recovered.state == rc.REPLICA_STATE_READY


async def test_load_report_stream_shows_running_work(start_replica: StartReplica) -> None:
    server = await start_replica(demo_spec())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        control = rc_grpc.ReplicaControlStub(channel)
        generate = gen_stub = stub(server.port)[1]
        work = [
            asyncio.ensure_future(
                gen_stub.Generate(
                    gen.GenerateRequest(
                        model="demo", prompt=f"{i}", max_tokens=800, temperature=0.0
                    )
                )
            )
            for i in range(4)
        ]
        reports = control.WatchLoad(rc.WatchLoadRequest(interval_ms=20))
        busiest = 0
        async for report in reports:
            assert report.model == "demo" and report.state == rc.REPLICA_STATE_READY
            busiest = max(busiest, report.running + report.queued)
            if busiest and report.tokens_in_flight > 0:
                break
        reports.cancel()
        await asyncio.gather(*work)
        del generate
        # A reply reaches the client a moment before the replica's own bookkeeping of it ends.
        for _ in range(100):
            final = (await control.GetStatus(rc.GetStatusRequest())).load
            if final.running == 0 and final.queued == 0:
                break
            await asyncio.sleep(0.02)
    assert busiest >= 1
    assert final.requests_total == 4 and final.tokens_total == 3200
    assert final.running == 0 and final.queued == 0


async def test_fake_engine_is_selectable_by_name_and_deterministic(
    start_replica: StartReplica,
) -> None:
    server = await start_replica(demo_spec(engine="fake", options={"token_delay_ms": "0"}))
    channel, client = stub(server.port)
    async with channel:
        resp = await client.Generate(gen.GenerateRequest(model="demo", prompt="abc", max_tokens=7))
    assert resp.text == "abcab"  # it echoes the prompt ids, BOS included (BOS decodes to nothing)
    assert len(resp.token_ids) == 7 and resp.token_ids[0] == resp.token_ids[4]
