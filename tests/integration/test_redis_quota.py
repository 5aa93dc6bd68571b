"""The Redis quota store on a real ``redis-server`` (started here on a free port): the same
results as the in-memory ledger, one global limit for several routers, and the configured
behaviour when Redis is down."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from conftest import (
    DAY,
    USER,
    Clock,
    RedisServer,
    StartReplica,
    StartRouter,
    demo_spec,
    generate,
    scrape,
    tenants_file,
)

from meshllm.api.errors import MeshError
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router.quota import Demand, QuotaExceeded, QuotaStore, TenantLimits
from meshllm.router.quota.memory import MemoryQuotaStore
from meshllm.router.quota.redis_store import RedisQuotaStore, redacted


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[Clock, QuotaStore, QuotaStore]]:
    clock = Clock(1_000 * DAY + DAY - 90.0)
    memory = MemoryQuotaStore(concurrency_retry_s=0.5, clock=clock)
    shared = RedisQuotaStore(
        redis_server.url, concurrency_retry_s=0.5, lease_s=300.0, timeout_s=1.0, clock=clock
    )
    yield clock, memory, shared
    await shared.close()


async def outcome(store: QuotaStore, limits: TenantLimits, tokens: int) -> object:
    try:
        r = await store.reserve("t", limits, Demand(tokens))
    except QuotaExceeded as e:
        return [
            (v.limit, None if v.retry_after_s is None else round(v.retry_after_s, 6))
            for v in e.violations
        ]
    return r


async def test_redis_scripts_give_the_ledgers_results(
    stores: tuple[Clock, QuotaStore, QuotaStore],
) -> None:
    clock, memory, shared = stores
    limits = TenantLimits(
        requests_per_minute=4, tokens_per_minute=300, concurrent_requests=3, tokens_per_day=700
    )
    held: dict[int, list[object]] = {0: [], 1: []}
    # (advance the clock by, reserve tokens) or (advance, settle the oldest with this many used)
    steps = [
        (0, "r", 100),
        (0, "r", 100),
        (1, "r", 150),
        (0, "r", 50),
        (0, "s", 20),
        (0, "r", 50),
        (0, "r", 5),
        (7.5, "r", 10),
        (0, "s", 400),
        (0, "s", 0),
        (30, "r", 200),
        (0, "r", 400),
        (61, "r", 10),
        (0, "s", 10),
        (0, "s", 10),
    ]
    for advance, op, amount in steps:
        clock.now += advance
        results = []
        for i, store in enumerate((memory, shared)):
            if op == "r":
                result = await outcome(store, limits, amount)
                if not isinstance(result, list):
                    held[i].append(result)
                    r = result.remaining  # type: ignore[attr-defined]
                    # Lua keeps 14 significant digits: compare to the microsecond
                    result = (
                        "admitted",
                        replace(
                            r,
                            reset_requests_s=round(r.reset_requests_s, 6),
                            reset_tokens_s=round(r.reset_tokens_s, 6),
                        ),
                    )
                results.append(result)
            else:
                await store.settle(held[i].pop(0), amount)  # type: ignore[arg-type]
                results.append(
                    sorted(
                        (u.limit, u.used, round(u.resets_in_s, 3))
                        for u in await store.usage("t", limits)
                    )
                )
        assert results[0] == results[1], (advance, op, amount)
    # the day rolled over during the run (it started 90 s before midnight): only the last
    # reservation counts, and settling yesterday's ones left today's count alone
    assert {u.limit: u.used for u in await shared.usage("t", limits)}["tokens_per_day"] == 10


async def test_a_dead_routers_concurrency_slots_expire_with_their_lease(
    redis_server: RedisServer,
) -> None:
    clock = Clock()
    store = RedisQuotaStore(
        redis_server.url, concurrency_retry_s=0.5, lease_s=30.0, timeout_s=1.0, clock=clock
    )
    limits = TenantLimits(concurrent_requests=1)
    await store.reserve("t", limits, Demand(1))  # never settled: its router "died"
    with pytest.raises(QuotaExceeded):
        await store.reserve("t", limits, Demand(1))
    clock.now += 30.001
    await store.reserve("t", limits, Demand(1))
    await store.close()


@pytest.mark.parametrize("url_from", ["redis_url", "redis_url_file"])
async def test_two_routers_sharing_redis_admit_exactly_the_global_limit(
    start_replica: StartReplica,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
    url_from: str,
) -> None:
    n = 6
    replica = await start_replica(demo_spec())
    url = redis_server.url
    if url_from == "redis_url_file":  # as the Helm chart mounts it from a Secret
        (tmp_path / "redis-url").write_text(url + "\n")
        url = str(tmp_path / "redis-url")
    shared = {
        "auth": "api-key",
        "tenants_file": tenants_file(tmp_path, requests_per_minute=n),
        "quota_store": "redis",
        url_from: url,
    }
    a, b = await start_router(replica, **shared), await start_router(replica, **shared)
    results = await asyncio.gather(
        *(generate(router) for _ in range(3 * n // 2) for router in (a, b))
    )
    admitted = [r for r, _ in results if isinstance(r, gen.GenerateResponse)]
    refused = [r for r, _ in results if isinstance(r, MeshError)]
    assert len(admitted) == n and len(refused) == 2 * n
    assert {e.code for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    # a third router with its own memory would have admitted another n: the limit is global
    alone = await start_router(replica, auth="api-key", tenants_file=shared["tenants_file"])
    assert isinstance((await generate(alone))[0], gen.GenerateResponse)
    assert isinstance((await generate(a))[0], MeshError)


def failures(metrics: str, outcome: str) -> float:
    prefix = (
        f'meshllm_router_quota_store_failures_total{{operation="reserve",outcome="{outcome}"}} '
    )
    return next(
        (float(line[len(prefix) :]) for line in metrics.splitlines() if line.startswith(prefix)),
        0.0,
    )


@pytest.mark.parametrize("policy", ["deny", "allow"])
async def test_redis_down_follows_the_setting_loudly(  # noqa: PLR0917 (fixtures)
    start_replica: StartReplica,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    policy: str,
) -> None:
    router = await start_router(
        await start_replica(demo_spec()),
        auth="api-key",
        quota_store="redis",
        metrics_port=0,
        tenants_file=tenants_file(tmp_path, requests_per_minute=100),
        redis_unavailable=policy,
        redis_url=redis_server.url,
    )
    assert isinstance((await generate(router))[0], gen.GenerateResponse)
    # off the event loop: the router and replica in this process must keep reporting meanwhile
    await asyncio.to_thread(redis_server.stop)
    with caplog.at_level(logging.ERROR, logger="meshllm.router.admission"):
        results = [(await generate(router))[0] for _ in range(3)]
    assert router.metrics_port is not None
    metrics = await asyncio.to_thread(scrape, router.metrics_port)
    if policy == "deny":
        for e in results:
            assert isinstance(e, MeshError) and e.code == grpc.StatusCode.UNAVAILABLE
            assert e.reason == "QUOTA_STORE_UNAVAILABLE" and e.retry_after is not None
        assert failures(metrics, "denied") == 3
    else:
        assert all(isinstance(r, gen.GenerateResponse) for r in results)
        assert failures(metrics, "allowed") == 3
    (line,) = [r.getMessage() for r in caplog.records if r.name == "meshllm.router.admission"]
    assert "quota store unreachable" in line and (policy == "deny") == ("refusing" in line)
    await asyncio.to_thread(redis_server.start)  # back: metered again, without a restart
    assert isinstance((await generate(router))[0], gen.GenerateResponse)
    assert USER not in caplog.text


def test_redis_urls_are_logged_without_their_password() -> None:
    assert redacted("redis://:s3cret@redis.ns.svc:6379/0") == "redis://:***@redis.ns.svc:6379/0"
    assert redacted("redis://user:s3cret@h/1") == "redis://user:***@h/1"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"


async def test_a_redis_freeze_frees_the_slots_it_held_once_redis_answers(
    start_replica: StartReplica,
    start_router: StartRouter,
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    """Two requests fill the tenant's two slots; Redis freezes (SIGSTOP) for 2 s while they end,
    so their settles fail. Once it answers again those settles go through: a client that waits
    what each refusal's RetryInfo says is admitted within seconds (it was refused until the
    leases expired, 900 s, while RetryInfo said 1 s)."""
    replica = await start_replica(demo_spec(engine="fake", options={"token_delay_ms": "10"}))
    router = await start_router(
        replica,
        auth="api-key",
        quota_store="redis",
        redis_url=redis_server.url,
        redis_timeout_s=0.25,
        tenants_file=tenants_file(tmp_path, concurrent_requests=2),
    )
    running = [asyncio.create_task(generate(router, max_tokens=40)) for _ in range(2)]
    await asyncio.sleep(0.15)  # both admitted; ~0.4 s to go
    refused = (await generate(router))[0]
    assert isinstance(refused, MeshError) and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        results = await asyncio.gather(*running)  # they end (and fail to settle) meanwhile
        assert all(isinstance(r, gen.GenerateResponse) for r, _ in results)
        await asyncio.sleep(2.0)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    thawed, waits = time.monotonic(), list[float]()
    while not isinstance(reply := (await generate(router))[0], gen.GenerateResponse):
        assert isinstance(reply, MeshError) and reply.retry_after is not None, reply
        assert time.monotonic() - thawed < 10, f"still refused: {reply.message} (waited {waits})"
        waits.append(reply.retry_after)
        await asyncio.sleep(reply.retry_after)
    # at most one refusal, and the time it said was enough
    assert len(waits) <= 1 and time.monotonic() - thawed < 3, waits
    # both slots are free again: two at once are admitted
    both = await asyncio.gather(generate(router), generate(router))
    assert all(isinstance(r, gen.GenerateResponse) for r, _ in both), both


async def test_settling_twice_counts_once_in_both_stores(
    stores: tuple[Clock, QuotaStore, QuotaStore],
) -> None:
    """A settle sent again (Redis may have run one that timed out) changes nothing."""
    _, memory, shared = stores
    limits = TenantLimits(tokens_per_minute=300, concurrent_requests=2)
    for store in (memory, shared):
        held = await store.reserve("t", limits, Demand(100))
        other = await store.reserve("t", limits, Demand(50))
        await store.settle(held, 20)
        await store.settle(held, 20)
        used = {u.limit: u.used for u in await store.usage("t", limits)}
        assert used == {"tokens_per_minute": 70, "concurrent_requests": 1}, store
        await store.settle(other, 50)


async def test_running_requests_keep_their_short_leases(redis_server: RedisServer) -> None:
    """Leases are renewed every third of lease_s while their request runs: a request longer
    than lease_s keeps its slot, and it frees when it settles."""
    clock = Clock()
    store = RedisQuotaStore(
        redis_server.url, concurrency_retry_s=0.5, lease_s=0.3, timeout_s=1.0, clock=clock
    )
    limits = TenantLimits(concurrent_requests=1)
    held = await store.reserve("t", limits, Demand(1))
    for _ in range(6):  # 1.2 s of its clock: four times the lease
        clock.now += 0.2
        await asyncio.sleep(0.15)
    with pytest.raises(QuotaExceeded):
        await store.reserve("t", limits, Demand(1))
    await store.settle(held, 1)
    await store.settle(await store.reserve("t", limits, Demand(1)), 1)
    await store.close()
