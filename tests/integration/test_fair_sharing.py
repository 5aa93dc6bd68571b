"""The router's fair queue through real servers: a router in front of a real replica (the fake
engine, one slot, 5 ms a token) with two keyed tenants, over gRPC and the HTTP front."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import (
    RedisServer,
    StartReplica,
    StartRouter,
    bearer,
    demo_spec,
    scrape,
    stub,
)

from meshllm.api.errors import from_rpc_error
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router import RouterServer
from meshllm.router.tenants import hash_key

FLOOD, LIGHT = "flood-key-1", "light-key-1"


async def saturated_router(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path, **config: object
) -> RouterServer:
    """One replica that runs one request at a time, tenants ``flood`` and ``light``."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        f'[[tenants]]\nname = "flood"\nkeys = ["{hash_key(FLOOD)}"]\nmax_queued = 20\n\n'
        f'[[tenants]]\nname = "light"\nkeys = ["{hash_key(LIGHT)}"]\nmax_priority = 1\n'
    )
    spec = demo_spec(
        engine="fake", max_batch_size=1, inter_threads=1, options={"token_delay_ms": "5"}
    )
    router = await start_router(
        await start_replica(spec), auth="api-key", tenants_file=str(tenants), **config
    )
    replica = next(iter(router.registry.replicas.values()))
    assert replica.report is not None and replica.report.capacity == 1
    return router


def request(max_tokens: int = 20, priority: int = 0) -> gen.GenerateRequest:
    return gen.GenerateRequest(
        model="demo", prompt="hello", max_tokens=max_tokens, priority=priority
    )


async def ended(client: object, key: str, req: gen.GenerateRequest) -> float:
    """When the reply ended; the order replies end in is the order they got the slot."""
    await client.Generate(req, metadata=bearer(key))  # type: ignore[attr-defined]
    return time.monotonic()


async def queued(router: RouterServer, count: int) -> None:
    for _ in range(500):
        model = router.queue.models.get("demo")
        if model is not None and len(model.queue) >= count:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"fewer than {count} requests queued")


async def test_a_light_tenant_overtakes_a_flood_waiting_for_the_one_slot(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await saturated_router(start_replica, start_router, tmp_path)
    channel, client = stub(router.port)
    async with channel:
        floods = [asyncio.create_task(ended(client, FLOOD, request())) for _ in range(6)]
        await queued(router, 5)  # one runs, five wait
        light = await ended(client, LIGHT, request())
        before = [end for end in await asyncio.gather(*floods) if end < light]
        assert len(before) == 1, "only the flood request running when it came went first"


async def test_sheddable_requests_are_refused_when_saturated_and_the_queue_is_scraped(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await saturated_router(start_replica, start_router, tmp_path, metrics_port=0)
    channel, client = stub(router.port)
    async with channel:
        await client.Generate(request(priority=-1), metadata=bearer(LIGHT))  # room: served
        running = asyncio.create_task(ended(client, FLOOD, request(max_tokens=200)))
        waiting = asyncio.create_task(ended(client, FLOOD, request()))
        await queued(router, 1)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.Generate(request(priority=-1), metadata=bearer(LIGHT))
        error = from_rpc_error(e.value)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.reason == "SHED" and error.retry_after is not None
        text = await asyncio.to_thread(scrape, router.metrics_port)  # type: ignore[arg-type]
        assert 'meshllm_router_queued_requests{model="demo"} 1.0' in text
        assert (
            'meshllm_router_queue_refusals_total{model="demo",reason="SHED",tenant="light"} 1.0'
            in text
        )
        await asyncio.gather(running, waiting)
    text = await asyncio.to_thread(scrape, router.metrics_port)  # type: ignore[arg-type]
    assert 'meshllm_router_queue_wait_seconds_count{model="demo"} 3.0' in text


async def test_a_request_cancelled_while_queued_never_reaches_the_replica(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await saturated_router(start_replica, start_router, tmp_path)
    replica = next(iter(router.registry.replicas.values()))
    channel, client = stub(router.port)
    async with channel:
        running = client.Generate(request(max_tokens=60), metadata=bearer(FLOOD))
        await asyncio.sleep(0.05)
        gone = client.GenerateStream(request(), metadata=bearer(LIGHT))
        await queued(router, 1)
        sent_before = replica.served_total
        gone.cancel()
        for _ in range(100):
            if not len(router.queue.models["demo"].queue):
                break
            await asyncio.sleep(0.01)
        assert len(router.queue.models["demo"].queue) == 0
        await running
        after = await client.Generate(request(max_tokens=2), metadata=bearer(LIGHT))
        assert after.usage.completion_tokens == 2
        assert replica.served_total == sent_before + 1  # only the last one was sent
        assert router.queue.models["demo"].pending == 0


async def test_a_wait_past_the_deadline_is_refused_early_over_grpc_and_http(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await saturated_router(start_replica, start_router, tmp_path, http_port=0)
    channel, client = stub(router.port)
    async with channel:
        for _ in range(6):  # a rate to predict from: ~10 requests a second
            await client.Generate(request(max_tokens=20), metadata=bearer(FLOOD))
        floods = [
            asyncio.ensure_future(client.Generate(request(max_tokens=20), metadata=bearer(FLOOD)))
            for _ in range(10)
        ]
        await queued(router, 9)  # ~1 s of work ahead of a flood request
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.Generate(request(), metadata=bearer(FLOOD), timeout=0.3)
        assert time.monotonic() - start < 0.25  # refused at once, not after waiting it out
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert from_rpc_error(e.value).reason == "QUEUE_WAIT_EXCEEDS_DEADLINE"
        # The HTTP front goes through the same queue: a sheddable request is a 429.
        body = json.dumps(
            {"model": "demo", "prompt": "hi", "max_tokens": 2, "priority": -1}
        ).encode()
        http = urllib.request.Request(
            f"http://127.0.0.1:{router.http_port}/v1/completions",
            data=body,
            headers={"Authorization": f"Bearer {LIGHT}", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, http, timeout=10)
        assert refused.value.code == 429 and refused.value.headers["Retry-After"]
        await asyncio.gather(*floods)


async def test_routers_sharing_redis_order_their_queues_by_the_same_counters(
    start_replica: StartReplica,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    shared = {"quota_store": "redis", "redis_url": redis_server.url, "queue_share_interval_s": 0.1}
    a = await saturated_router(start_replica, start_router, tmp_path, **shared)
    b = await start_router(
        *(r.address for r in a.registry.replicas.values()),
        auth="api-key",
        tenants_file=a.config.tenants_file,
        **shared,
    )
    channel_a, client_a = stub(a.port)
    channel_b, client_b = stub(b.port)
    async with channel_a, channel_b:
        for _ in range(3):  # the flood is served through a only
            await client_a.Generate(request(max_tokens=20), metadata=bearer(FLOOD))
        await client_b.Generate(request(max_tokens=2), metadata=bearer(LIGHT))
    flood_a = a.queue.models["demo"].queue.served("flood")
    light_b = b.queue.models["demo"].queue.served("light")
    assert flood_a >= 60 and light_b >= 2  # 3 x 20 and 2 tokens, plus the prompts

    def learned() -> tuple[float, float]:
        return (
            b.queue.models["demo"].queue.served("flood"),
            a.queue.models["demo"].queue.served("light"),
        )

    for _ in range(100):  # each learns the other's counts within a sync or two
        if learned() == pytest.approx((flood_a, light_b)):
            break
        await asyncio.sleep(0.05)
    assert learned() == pytest.approx((flood_a, light_b))
    # Each also knows the tenants active on the other (for the reserve), with nothing running.
    assert a.queue.models["demo"].elsewhere.get("light") == (1.0, 0)
    assert b.queue.models["demo"].elsewhere.get("flood") == (1.0, 0)
    assert "flood" not in a.queue.models["demo"].elsewhere  # its own, not another router's
