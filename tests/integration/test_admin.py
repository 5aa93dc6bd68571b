"""Admin load control through a real router in front of three real, initially idle replicas."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from conftest import (
    ADMIN,
    USER,
    RedisServer,
    StartReplica,
    StartRouter,
    bearer,
    tenants_file,
    wait_routed,
)

from meshllm.api.errors import MeshError, from_rpc_error
from meshllm.api.types import FinishReason
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.api.v1 import replica_control_pb2_grpc as rc_grpc
from meshllm.client import AsyncClient
from meshllm.replica.server import ReplicaServer
from meshllm.router import RouterServer
from meshllm.router.config import DiscoveryConfig, PlacementConfig
from meshllm.router.placement import CatalogModel
from meshllm.router.placement.control import Placement
from meshllm.router.pool import LinkSettings, ReplicaPool
from meshllm.router.registry import Registry

READY, FAILED, DRAINING = (
    rc.REPLICA_STATE_READY,
    rc.REPLICA_STATE_FAILED,
    rc.REPLICA_STATE_DRAINING,
)
CATALOG = (
    CatalogModel.of(id="demo", path="demo", desired_replicas=1, max_replicas=2),
    CatalogModel.of(id="second", path="demo", max_replicas=2),  # the demo weights under another id
    CatalogModel.of(id="broken", path="/does/not/exist"),
)
Replicas = list[ReplicaServer]


@pytest.fixture
async def idle(start_replica: StartReplica) -> Replicas:
    """Three replicas with no model (r0, r1, r2): the router decides what they host."""
    return [await start_replica(None) for _ in range(3)]


def hosted(replicas: Replicas) -> dict[str, str]:
    """replica id -> the model it hosts ("" for none), as the replicas themselves say."""
    out = {}
    for server in replicas:
        assert server.replica is not None
        spec = server.replica.spec
        out[server.replica.name] = spec.id if spec is not None else ""
    return out


async def admin_call(router: RouterServer, method: str, request: object, key: str = "") -> object:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        call: Callable[..., Awaitable[object]] = getattr(adm_grpc.AdminStub(channel), method)
        return await call(request, metadata=bearer(key) if key else None)


async def admin_error(
    router: RouterServer, method: str, request: object, key: str = ""
) -> MeshError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await admin_call(router, method, request, key)
    return from_rpc_error(failed.value)


async def placement(router: RouterServer, model: str) -> adm.ModelPlacement:
    reply = await admin_call(router, "ListModels", adm.AdminListModelsRequest())
    assert isinstance(reply, adm.AdminListModelsResponse)
    return next(m for m in reply.models if m.model == model)


async def generate(router: RouterServer, model: str, max_tokens: int = 8) -> gen.GenerateResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        request = gen.GenerateRequest(
            model=model, prompt="hi", max_tokens=max_tokens, temperature=0.0
        )
        response: gen.GenerateResponse = await gen_grpc.GenerationStub(channel).Generate(request)
        return response


@pytest.fixture
async def router(idle: Replicas, start_router: StartRouter) -> RouterServer:
    """A router with the catalog; ``demo`` (desired 1) is placed on r0 at start."""
    router = await start_router(*idle, ready=1, models=CATALOG, placement_refresh_s=0.2)
    assert hosted(idle) == {"r0": "demo", "r1": "", "r2": ""}
    return router


async def test_catalog_models_are_placed_at_start_and_a_second_model_on_an_idle_replica(
    router: RouterServer, idle: Replicas
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as not_loaded:
            await gen_grpc.GenerationStub(channel).Generate(
                gen.GenerateRequest(model="second", prompt="x", max_tokens=2)
            )
    error = from_rpc_error(not_loaded.value)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "MODEL_NOT_LOADED"

    loaded = await admin_call(
        router, "LoadModel", adm.AdminLoadModelRequest(model="second", wait=True)
    )
    assert isinstance(loaded, adm.ModelPlacement)
    assert loaded.ready_replicas == 1 and [r.replica_id for r in loaded.replicas] == ["r1"]
    assert hosted(idle) == {"r0": "demo", "r1": "second", "r2": ""}
    await wait_routed(router, 2)
    assert (await generate(router, "second")).timing.replica == "r1"
    assert (await generate(router, "demo")).timing.replica == "r0"

    listing = await admin_call(router, "ListModels", adm.AdminListModelsRequest())
    assert isinstance(listing, adm.AdminListModelsResponse)
    by_model = {m.model: m for m in listing.models}
    assert set(by_model) == {"demo", "second", "broken"}
    assert by_model["demo"].configured and by_model["demo"].desired_replicas == 1
    assert by_model["broken"].ready_replicas == 0 and not by_model["broken"].replicas
    replicas = await admin_call(router, "ListReplicas", adm.ListReplicasRequest())
    assert isinstance(replicas, adm.ListReplicasResponse)
    memory = {r.replica_id: r.memory for r in replicas.replicas}
    assert set(memory) == {"r0", "r1", "r2"}
    assert all(m.source == "process" and m.used_bytes > 0 for m in memory.values())


async def test_concurrent_duplicate_loads_result_in_one_load(
    router: RouterServer, idle: Replicas
) -> None:
    request = adm.AdminLoadModelRequest(model="second", replicas=1, wait=True)
    first, second = await asyncio.gather(
        admin_call(router, "LoadModel", request), admin_call(router, "LoadModel", request)
    )
    assert isinstance(first, adm.ModelPlacement) and isinstance(second, adm.ModelPlacement)
    assert first.ready_replicas == second.ready_replicas == 1
    assert (
        list(hosted(idle).values()).count("second") == 1
    )  # max_replicas 2: a double load could fit
    # and again later: it counts the replica already loaded
    again = await admin_call(router, "LoadModel", request)
    assert isinstance(again, adm.ModelPlacement) and again.ready_replicas == 1
    assert list(hosted(idle).values()).count("second") == 1


async def test_a_bad_path_fails_with_the_reason_and_leaves_the_replica_usable(
    router: RouterServer, idle: Replicas
) -> None:
    error = await admin_error(
        router, "LoadModel", adm.AdminLoadModelRequest(model="broken", wait=True)
    )
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "MODEL_LOAD_FAILED"
    assert "/does/not/exist" in error.message
    broken = await placement(router, "broken")
    assert [(r.replica_id, r.state) for r in broken.replicas] == [("r1", FAILED)]
    assert "/does/not/exist" in broken.replicas[0].error
    assert (
        broken.desired_replicas == 0
    )  # a failed load changes nothing: no retrying behind your back

    loaded = await admin_call(
        router, "LoadModel", adm.AdminLoadModelRequest(model="second", wait=True)
    )
    assert isinstance(loaded, adm.ModelPlacement)
    assert [r.replica_id for r in loaded.replicas] == [
        "r1"
    ]  # the failed replica took the next load
    assert loaded.ready_replicas == 1

    unknown = await admin_error(router, "LoadModel", adm.AdminLoadModelRequest(model="nope"))
    assert unknown.code == grpc.StatusCode.NOT_FOUND and "demo" in unknown.message


async def test_scale_follows_the_catalog_limits(router: RouterServer, idle: Replicas) -> None:
    up = await admin_call(
        router, "ScaleModel", adm.ScaleModelRequest(model="demo", replicas=2, wait=True)
    )
    assert (
        isinstance(up, adm.ModelPlacement) and up.ready_replicas == 2 and up.desired_replicas == 2
    )
    assert hosted(idle) == {"r0": "demo", "r1": "demo", "r2": ""}
    too_many = await admin_error(
        router, "ScaleModel", adm.ScaleModelRequest(model="demo", replicas=3)
    )
    assert too_many.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in too_many.field_violations] == ["replicas"]
    assert list(hosted(idle).values()).count("demo") == 2

    await wait_routed(router, 2)
    down = await admin_call(router, "ScaleModel", adm.ScaleModelRequest(model="demo", replicas=1))
    assert isinstance(down, adm.ModelPlacement) and down.ready_replicas == 1
    assert list(hosted(idle).values()).count("demo") == 1
    await asyncio.sleep(0.5)  # several reconcile rounds: nothing is placed back
    assert list(hosted(idle).values()).count("demo") == 1
    assert (await generate(router, "demo")).usage.completion_tokens == 8


async def test_unloading_under_steady_traffic_loses_no_request(
    idle: Replicas, start_router: StartRouter
) -> None:
    catalog = (CatalogModel.of(id="demo", path="demo", desired_replicas=2),)
    router = await start_router(*idle, ready=2, models=catalog)
    outcomes: list[tuple[float, int, str]] = []  # (start time, tokens, status or "OK")
    stop = asyncio.Event()

    async def client() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            stub = gen_grpc.GenerationStub(channel)
            while not stop.is_set():
                started, tokens = time.monotonic(), 0
                request = gen.GenerateRequest(
                    model="demo", prompt="go", max_tokens=60, temperature=0.0
                )
                try:
                    async for chunk in stub.GenerateStream(request):
                        tokens += len(chunk.token_ids)
                    outcomes.append((started, tokens, "OK"))
                except grpc.aio.AioRpcError as e:
                    err = from_rpc_error(e)
                    outcomes.append((started, tokens, f"{e.code().name}/{err.reason}"))
                    await asyncio.sleep(0.01)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await asyncio.sleep(0.5)
    scaled_at = time.monotonic()
    await admin_call(
        router, "ScaleModel", adm.ScaleModelRequest(model="demo", replicas=1, drain_timeout_s=10)
    )
    await asyncio.sleep(0.5)
    unload_at = time.monotonic()
    unloaded = await admin_call(
        router, "UnloadModel", adm.AdminUnloadModelRequest(model="demo", drain_timeout_s=10)
    )
    unloaded_at = time.monotonic()
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*clients)

    assert isinstance(unloaded, adm.ModelPlacement) and not unloaded.replicas
    assert hosted(idle) == {"r0": "", "r1": "", "r2": ""}
    # (a request sent in the last moments before the unload may reach a draining replica)
    before_unload = [o for o in outcomes if o[0] < unload_at - 0.1]
    assert (
        len([o for o in before_unload if o[0] > scaled_at]) > 5
    )  # traffic ran through the scale-down
    # while one replica still served it, every request ran to its end: scale-down lost nothing
    bad = [(t - unload_at, n, st) for t, n, st in before_unload if st != "OK" or n != 60]
    assert not bad, bad
    after = [o for o in outcomes if o[0] >= unloaded_at]
    assert after and all(tokens == 0 for _, tokens, _ in after)  # refused up front, never cut short
    assert {s for _, _, s in after} == {"FAILED_PRECONDITION/MODEL_NOT_LOADED"}
    # while it drained: finished whole, or refused before a token with a clear reason
    for _, tokens, status in outcomes:
        assert (status == "OK" and tokens == 60) or (
            tokens == 0
            and status
            in {
                "FAILED_PRECONDITION/MODEL_NOT_LOADED",
                "UNAVAILABLE/NO_HEALTHY_REPLICA",
                "UNAVAILABLE/REPLICA_DRAINING",
            }
        ), (tokens, status)


async def test_a_scale_down_past_its_drain_timeout_never_reports_a_cut_reply_as_ok(
    idle: Replicas, start_router: StartRouter
) -> None:
    """Streams the drained replica cut short at the timeout end UNAVAILABLE STREAM_INTERRUPTED
    (they once ended OK with finish_reason cancelled); unary calls there move to the replica
    that stays, so a batch gets every item whole."""
    slow = {"engine": "fake", "options": {"token_delay_ms": "4"}}
    catalog = (CatalogModel.of(id="demo", path="demo", desired_replicas=2, **slow),)
    router = await start_router(*idle, ready=2, models=catalog)
    tokens = 300  # ~1.2 s per reply: the 0.5 s drain timeout cuts every one running there

    async def stream(stub: gen_grpc.GenerationStub, i: int) -> tuple[int, str]:
        request = gen.GenerateRequest(model="demo", prompt=f"s{i}", max_tokens=tokens)
        got, final = 0, gen.FINISH_REASON_UNSPECIFIED
        try:
            async for chunk in stub.GenerateStream(request):
                got, final = got + len(chunk.token_ids), chunk.finish_reason
        except grpc.aio.AioRpcError as e:
            return got, f"{e.code().name}/{from_rpc_error(e).reason}"
        return got, f"OK/{gen.FinishReason.Name(final)}"

    async with (
        AsyncClient(f"127.0.0.1:{router.port}", timeout=30) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel,
    ):
        stub = gen_grpc.GenerationStub(channel)
        streams = [asyncio.create_task(stream(stub, i)) for i in range(8)]
        # The streams first, so least-busy splits them 4 and 4: sent interleaved with the batch
        # items, alternate picks could put every stream on the replica that stays.
        for _ in range(500):
            if sum(r.inflight for r in router.registry.replicas.values()) == 8:
                break
            await asyncio.sleep(0.01)
        batch = asyncio.create_task(
            client.generate_batch(
                [f"b{i}" for i in range(8)], model="demo", max_tokens=tokens, temperature=0.0
            )
        )
        await asyncio.sleep(0.3)  # every stream and batch item is generating
        await admin_call(
            router,
            "ScaleModel",
            adm.ScaleModelRequest(model="demo", replicas=1, drain_timeout_s=0.5),
        )
        outcomes, items = await asyncio.gather(asyncio.gather(*streams), batch)
    for got, status in outcomes:
        assert (status, got) == ("OK/FINISH_REASON_LENGTH", tokens) or (
            status == "UNAVAILABLE/STREAM_INTERRUPTED" and 0 < got < tokens
        ), (status, got)
    assert any(s.startswith("UNAVAILABLE") for _, s in outcomes), outcomes  # the drain cut some
    for item in items:
        assert item.result is not None, item.error
        assert item.result.finish_reason is FinishReason.LENGTH
        assert item.result.usage.completion_tokens == tokens
    assert list(hosted(idle).values()).count("demo") == 1


async def test_drain_and_undrain_one_replica(router: RouterServer, idle: Replicas) -> None:
    await admin_call(
        router, "ScaleModel", adm.ScaleModelRequest(model="demo", replicas=2, wait=True)
    )
    await wait_routed(router, 2)
    status = await admin_call(router, "DrainReplica", adm.DrainReplicaRequest(replica_id="r0"))
    assert isinstance(status, rc.ReplicaStatus) and status.state == DRAINING
    served = {(await generate(router, "demo")).timing.replica for _ in range(8)}
    assert served == {"r1"}
    assert hosted(idle)["r0"] == "demo"  # drained, not unloaded
    status = await admin_call(router, "UndrainReplica", adm.UndrainReplicaRequest(replica_id="r0"))
    assert isinstance(status, rc.ReplicaStatus) and status.state == READY
    await wait_routed(router, 2)
    missing = await admin_error(router, "DrainReplica", adm.DrainReplicaRequest(replica_id="r9"))
    assert missing.code == grpc.StatusCode.NOT_FOUND and "r0" in missing.message
    idle_one = await admin_error(router, "DrainReplica", adm.DrainReplicaRequest(replica_id="r2"))
    assert idle_one.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_restarting_the_router_keeps_serving_without_reloading(
    idle: Replicas, start_router: StartRouter
) -> None:
    catalog = (
        CatalogModel.of(id="demo", path="demo", desired_replicas=2),
        CatalogModel.of(id="second", path="demo", desired_replicas=1),
    )
    first = await start_router(*idle, ready=3, models=catalog)
    models = {s.replica.name: s.replica.model for s in idle if s.replica is not None}
    assert sorted(hosted(idle).values()) == ["demo", "demo", "second"]
    await first.stop(grace_s=0.5)

    second = await start_router(*idle, ready=3, models=catalog)
    await asyncio.sleep(0.5)  # placement settled and ran a few rounds
    assert {s.replica.name: s.replica.model for s in idle if s.replica is not None} == models
    assert all(m is not None for m in models.values())
    assert (await generate(second, "demo")).usage.completion_tokens == 8
    assert (await generate(second, "second")).usage.completion_tokens == 8


async def test_admin_calls_need_the_admin_role(
    idle: Replicas, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await start_router(
        *idle, ready=1, models=CATALOG, auth="api-key", tenants_file=tenants_file(tmp_path)
    )
    calls = [
        ("LoadModel", adm.AdminLoadModelRequest(model="second")),
        ("UnloadModel", adm.AdminUnloadModelRequest(model="demo")),
        ("ScaleModel", adm.ScaleModelRequest(model="demo", replicas=2)),
        ("DrainReplica", adm.DrainReplicaRequest(replica_id="r0")),
        ("ListModels", adm.AdminListModelsRequest()),
    ]
    for method, request in calls:
        denied = await admin_error(router, method, request, key=USER)
        assert denied.code == grpc.StatusCode.PERMISSION_DENIED, method
    assert hosted(idle) == {"r0": "demo", "r1": "", "r2": ""}  # nothing happened
    listing = await admin_call(router, "ListModels", adm.AdminListModelsRequest(), key=ADMIN)
    assert isinstance(listing, adm.AdminListModelsResponse) and len(listing.models) == 3


@pytest.mark.parametrize("shared", [True, False], ids=["redis", "memory"])
async def test_a_scale_down_through_one_router_holds_for_routers_sharing_redis(
    idle: Replicas, start_router: StartRouter, redis_server: RedisServer, shared: bool
) -> None:
    catalog = (CatalogModel.of(id="demo", path="demo", desired_replicas=2),)
    settings: dict[str, object] = {"models": catalog, "placement_refresh_s": 0.2}
    if shared:
        settings |= {
            "quota_store": "redis",
            "redis_url": redis_server.url,
            "share_placement_counts": True,
        }
    first = await start_router(*idle, ready=2, **settings)
    second = await start_router(*idle, ready=2, **settings)
    await admin_call(first, "ScaleModel", adm.ScaleModelRequest(model="demo", replicas=1))
    await asyncio.sleep(1.0)  # five placement rounds of the other router
    # without a shared count, the other router still wants the catalog's 2 and places it back
    assert list(hosted(idle).values()).count("demo") == (1 if shared else 2)
    assert (await placement(second, "demo")).desired_replicas == (1 if shared else 2)
    if not shared:
        return
    await first.stop(grace_s=0.5)
    await second.stop(grace_s=0.5)
    restarted = await start_router(*idle, ready=1, **settings)
    await asyncio.sleep(0.5)
    assert list(hosted(idle).values()).count("demo") == 1  # the admin's count outlives routers
    assert (await placement(restarted, "demo")).desired_replicas == 1
    # a new catalog value is a newer decision than the old admin call
    settings["models"] = (replace(catalog[0], desired_replicas=3),)
    await start_router(*idle, ready=3, **settings)
    assert list(hosted(idle).values()).count("demo") == 3


async def meshllm(router: RouterServer, *args: str) -> tuple[int, str, str]:
    """Run the ``meshllm`` CLI as a process against ``router``: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshllm.client.cli",
        "--target",
        f"127.0.0.1:{router.port}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_admin_cli_loads_lists_and_explains_refusals(
    router: RouterServer, idle: Replicas
) -> None:
    code, out, _ = await meshllm(router, "admin", "load", "second", "--set", "max_batch_size=4")
    assert code == 0 and out.splitlines()[0] == "second: 1 ready (desired 1, max 2)"
    assert out.splitlines()[1].split()[:3] == ["r1", "ready", "second"]
    assert idle[1].replica is not None and idle[1].replica.spec is not None
    assert idle[1].replica.spec.max_batch_size == 4  # the one-off override reached the replica
    code, out, _ = await meshllm(router, "admin", "models", "--json")
    models = {m["model"]: m for m in json.loads(out)["models"]}
    assert code == 0 and models["second"]["ready_replicas"] == 1 and models["demo"]["configured"]
    code, out, _ = await meshllm(router, "admin", "replicas")
    assert [line.split()[:3] for line in out.splitlines()] == [
        ["r0", "ready", "demo"],
        ["r1", "ready", "second"],
        ["r2", "empty", "-"],
    ]
    code, _, err = await meshllm(router, "admin", "scale", "demo", "9")
    assert code == 1 and "max_replicas 2" in err and "InvalidArgument" in err
    code, _, err = await meshllm(router, "admin", "load", "second", "--set", "speed=9")
    assert code == 1 and "--set 'speed=9'" in err


class NeverLoads(rc_grpc.ReplicaControlServicer):
    """A test double: a replica whose LoadModel never answers (the rest is unimplemented)."""

    async def LoadModel(self, request: rc.LoadModelRequest, context: object) -> rc.ReplicaStatus:
        await asyncio.sleep(60)
        return rc.ReplicaStatus()


async def test_a_replica_removed_before_or_during_a_load_is_not_held_against_the_model() -> None:
    """Discovery dropping a replica (scaled down, rescheduled) says nothing about the model:
    placement must not back off from it for ``load_retry_s``."""
    server = grpc.aio.server()
    rc_grpc.add_ReplicaControlServicer_to_server(NeverLoads(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    entry = CatalogModel.of(id="demo", path="demo")
    registry = Registry(stale_after_s=2.0)
    links = LinkSettings(
        discovery=DiscoveryConfig(stale_after_s=2.0),
        tls=None,
        max_message_bytes=4 << 20,
        drain_grace_s=0.0,
    )
    pool = ReplicaPool(links, registry, lambda: None)
    placement = Placement(PlacementConfig(), (entry,), registry, pool)
    try:
        pool.sync([f"127.0.0.1:{port}"])
        (replica,) = registry.replicas.values()
        loading = placement.loads.start(replica, entry)
        await asyncio.sleep(0.3)  # the LoadModel call is under way
        pool.sync([])
        assert "CANCELLED" in await asyncio.wait_for(loading, 5)
        assert replica.claim == ""

        gone = Registry(stale_after_s=2.0).add("10.0.0.9:1")  # chosen, then removed at once
        assert await placement.loads.start(gone, entry) == f"{gone.name}: the replica was removed"
        assert gone.claim == ""
        assert placement.loads.failures == {}
    finally:
        await pool.close()
        await server.stop(None)
