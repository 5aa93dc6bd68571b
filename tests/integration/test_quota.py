"""API keys and quotas through a real router in front of real replicas (in-memory store)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from conftest import (
    ADMIN,
    USER,
    StartReplica,
    StartRouter,
    bearer,
    demo_spec,
    generate,
    scrape,
    tenants_file,
)

from meshllm.api.errors import MeshError
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.router import RouterServer


async def quota_usage(router: RouterServer, key: str = ADMIN) -> dict[str, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        admin = adm_grpc.AdminStub(channel)
        reply = await admin.GetQuotaUsage(
            adm.GetQuotaUsageRequest(tenant="batch"), metadata=bearer(key)
        )
    return {u.limit: u.used for u in reply.usage}


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_n_requests_per_minute_admit_exactly_n_of_3n_concurrent(
    start_replica: StartReplica,
    start_router: StartRouter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = 5
    router = await start_router(
        await start_replica(demo_spec()),
        auth="api-key",
        metrics_port=0,
        tenants_file=tenants_file(tmp_path, requests_per_minute=n),
    )
    with caplog.at_level(logging.INFO, logger="meshllm.requests"):
        results = await asyncio.gather(*(generate(router) for _ in range(3 * n)))
    admitted = [headers for r, headers in results if isinstance(r, gen.GenerateResponse)]
    refused = [r for r, _ in results if isinstance(r, MeshError)]
    assert len(admitted) == n and len(refused) == 2 * n
    assert sorted(int(h["x-ratelimit-remaining-requests"]) for h in admitted) == list(range(n))
    assert {h["x-ratelimit-limit-requests"] for h in admitted} == {str(n)}
    for e in refused:
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "QUOTA_EXCEEDED"
        assert e.retry_after is not None and 0 < e.retry_after <= 60 / n
        assert [q.subject for q in e.quota_violations] == ["tenant:batch"]
        assert "requests_per_minute" in e.quota_violations[0].description
    # the access log names the tenant of every request, refused ones included
    # (the replica's lines, from the same process here, have no tenant: it never sees keys)
    lines = [r for r in caplog.records if r.name == "meshllm.requests" and hasattr(r, "tenant")]
    assert [getattr(r, "tenant", None) for r in lines] == ["batch"] * 3 * n
    assert [getattr(r, "code", "") for r in lines].count("RESOURCE_EXHAUSTED") == 2 * n
    assert router.metrics_port is not None
    metrics = await asyncio.to_thread(scrape, router.metrics_port)
    assert (
        f'meshllm_router_quota_rejections_total{{limit="requests_per_minute",tenant="batch"}} {2 * n}.0'
        in metrics
    )


async def test_a_cancelled_stream_gives_its_unused_tokens_back(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    replica = await start_replica(demo_spec(engine="fake", options={"token_delay_ms": "5"}))
    router = await start_router(
        replica,
        auth="api-key",
        tenants_file=tenants_file(tmp_path, tokens_per_minute=60_000, tokens_per_day=1_000_000),
    )
    request = gen.GenerateRequest(model="demo", token_ids=[5] * 8, max_tokens=2000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        call = gen_grpc.GenerationStub(channel).GenerateStream(request, metadata=bearer(USER))
        assert dict(await call.initial_metadata())["x-ratelimit-remaining-tokens"] == str(
            60_000 - 2008
        )
        received = 0
        async for chunk in call:
            received += len(chunk.token_ids)
            if received >= 10:
                break
        assert (await quota_usage(router))["tokens_per_day"] == 2008  # held while it runs
        call.cancel()

    async def settled() -> bool:
        return (await quota_usage(router))["tokens_per_day"] != 2008

    await eventually(settled)
    used = await quota_usage(router)
    # charged: the 8 prompt tokens and what was generated before the cancel reached the engine
    # (the daily count does not refill, so it shows the settle exactly)
    assert 8 + received <= used["tokens_per_day"] < 8 + 300
    assert used["tokens_per_minute"] <= used["tokens_per_day"]


async def test_retry_info_delay_is_honoured(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await start_router(
        await start_replica(demo_spec()),
        auth="api-key",
        tenants_file=tenants_file(tmp_path, requests_per_minute=30),
    )
    while True:  # spend the burst: one request refills every 2 s
        result, _ = await generate(router, max_tokens=1)
        if isinstance(result, MeshError):
            break
    assert result.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = result.retry_after
    assert retry is not None and 0 < retry <= 2.0
    await asyncio.sleep(retry / 2)
    early, _ = await generate(router, max_tokens=1)
    assert isinstance(early, MeshError) and early.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert early.retry_after is not None and early.retry_after < retry
    await asyncio.sleep(early.retry_after + 0.05)
    on_time, headers = await generate(router, max_tokens=1)
    assert isinstance(on_time, gen.GenerateResponse), on_time
    assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_keys_and_roles_guard_every_service(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await start_router(
        await start_replica(demo_spec()), auth="api-key", tenants_file=tenants_file(tmp_path)
    )
    ok, headers = await generate(router)
    assert (
        isinstance(ok, gen.GenerateResponse) and headers.get("x-ratelimit-limit-requests") is None
    )
    for key in ("", "wrong-key"):
        refused, _ = await generate(router, key=key)
        assert isinstance(refused, MeshError) and refused.code == grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        admin, generation = adm_grpc.AdminStub(channel), gen_grpc.GenerationStub(channel)
        for call in (
            admin.ListReplicas(adm.ListReplicasRequest(), metadata=bearer(USER)),
            admin.GetQuotaUsage(adm.GetQuotaUsageRequest(), metadata=bearer(USER)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await call
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "role 'admin'" in str(denied.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await admin.ListReplicas(adm.ListReplicasRequest())
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replicas = await admin.ListReplicas(adm.ListReplicasRequest(), metadata=bearer(ADMIN))
        assert [(r.replica_id, r.load.model) for r in replicas.replicas] == [("r0", "demo")]
        with pytest.raises(grpc.aio.AioRpcError) as listing:
            await generation.ListModels(gen.ListModelsRequest())
        assert listing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        models = await generation.ListModels(gen.ListModelsRequest(), metadata=bearer(USER))
        assert [m.id for m in models.models] == ["demo"]


async def test_concurrent_requests_limit_and_a_request_that_never_fits(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    replica = await start_replica(demo_spec(engine="fake", options={"token_delay_ms": "5"}))
    router = await start_router(
        replica,
        auth="api-key",
        tenants_file=tenants_file(tmp_path, concurrent_requests=1, tokens_per_minute=1000),
    )
    slow = asyncio.create_task(generate(router, max_tokens=100))
    await eventually(lambda: _running(router))
    second, _ = await generate(router)
    assert isinstance(second, MeshError) and second.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "concurrent_requests" in second.quota_violations[0].description
    first, _ = await slow
    assert isinstance(first, gen.GenerateResponse)
    third, _ = await generate(router)
    assert isinstance(third, gen.GenerateResponse)
    too_big, _ = await generate(router, max_tokens=1500)
    assert isinstance(too_big, MeshError) and too_big.code == grpc.StatusCode.INVALID_ARGUMENT
    assert too_big.reason == "REQUEST_EXCEEDS_QUOTA"
    assert [v.field for v in too_big.field_violations] == ["max_tokens"]


async def _running(router: RouterServer) -> bool:
    return sum(r.inflight for r in router.registry.replicas.values()) == 1
