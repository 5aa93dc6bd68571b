"""The client against real servers on loopback: batches through a router, the response cache,
the sync twin (also inside a running event loop) and its signatures."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import StartProcess, StartReplica, StartRouter, demo_spec

from meshllm.api import errors
from meshllm.client import (
    AdminClient,
    AsyncAdminClient,
    AsyncClient,
    BatchOptions,
    Client,
    ResponseCache,
    RetryPolicy,
)


async def test_batch_through_a_router_keeps_order_and_gives_each_failure_its_error(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    replicas = [await start_replica(demo_spec()) for _ in range(2)]
    router = await start_router(*replicas)
    # every 10th item asks for more tokens than the model allows: INVALID_ARGUMENT, that item only
    prompts = [
        {"prompt": f"item {i}", "max_tokens": 10_000 if i % 10 == 3 else 4} for i in range(200)
    ]
    seen: list[int] = []
    async with AsyncClient(f"127.0.0.1:{router.port}", timeout=30) as client:
        options = BatchOptions(
            concurrency=16, on_result=lambda index, result, error: seen.append(index)
        )
        items = await client.generate_batch(prompts, model="demo", temperature=0.0, options=options)
    assert [item.index for item in items] == list(range(200))
    assert sorted(seen) == list(range(200))
    for item in items:
        if item.index % 10 == 3:
            assert item.result is None and isinstance(item.error, errors.InvalidArgument)
            assert item.attempts == 1  # never retried
        else:
            assert item.error is None and item.result is not None
            assert item.result.usage.completion_tokens == 4
    served = Counter(item.result.replica for item in items if item.result)
    assert set(served) == {"r0", "r1"}


async def test_leaving_iter_batch_early_cancels_what_is_in_flight(
    start_replica: StartReplica,
) -> None:
    replica = await start_replica(demo_spec())
    read = 0

    def endless() -> Iterator[str]:
        nonlocal read
        while True:
            read += 1
            yield f"prompt {read}"

    started = time.monotonic()
    async with AsyncClient(f"127.0.0.1:{replica.port}") as client:
        items = client.iter_batch(
            endless(), model="demo", max_tokens=2000, options=BatchOptions(concurrency=8)
        )
        async with contextlib.aclosing(items):
            first = [await anext(items) for _ in range(3)]
    assert [item.index for item in first] == [0, 1, 2]
    assert read <= 3 + 4 * 8  # never more than the window was read
    assert time.monotonic() - started < 30
    assert replica.replica is not None
    for _ in range(100):  # the cancelled calls end on the replica too
        report = replica.replica.load_report()
        if report.running + report.queued == 0:
            break
        await asyncio.sleep(0.05)
    assert report.running + report.queued == 0


async def test_cache_answers_greedy_requests_again_without_the_server(
    start_replica: StartReplica, tmp_path: Path
) -> None:
    replica = await start_replica(demo_spec())
    target, path = f"127.0.0.1:{replica.port}", tmp_path / "cache.sqlite"
    prompts = [f"cache me {i}" for i in range(5)]
    async with AsyncClient(target, cache=path) as client:
        first = await client.generate_batch(prompts, model="demo", max_tokens=6, temperature=0.0)
        sampled = await client.generate("not cached", model="demo", max_tokens=6)  # temperature 1
    assert all(item.result and not item.result.cached for item in first)
    assert not sampled.cached and len(ResponseCache(path)) == 5
    await replica.stop(grace_s=0.1)
    no_retry = BatchOptions(retry=RetryPolicy(max_attempts=1))
    async with AsyncClient(target, cache=path, timeout=5) as client:
        again = await client.generate_batch(prompts, model="demo", max_tokens=6, temperature=0.0)
        one = await client.generate(prompts[0], model="demo", max_tokens=6, temperature=0.0)
        other = await client.generate_batch(
            prompts[:1], model="demo", max_tokens=7, temperature=0.0, options=no_retry
        )
        with pytest.raises(errors.Unavailable):
            await client.generate("not cached", model="demo", max_tokens=6)
    assert [i.result.text for i in again if i.result] == [i.result.text for i in first if i.result]
    assert all(i.result and i.result.cached and i.attempts == 0 for i in again)
    assert one.cached and first[0].result is not None and one.text == first[0].result.text
    assert isinstance(other[0].error, errors.Unavailable)  # another max_tokens: another key
    async with AsyncClient(target, cache=ResponseCache(path, refresh=True), timeout=5) as client:
        refreshed = await client.generate_batch(
            prompts[:1], model="demo", max_tokens=6, temperature=0.0, options=no_retry
        )
    assert isinstance(refreshed[0].error, errors.Unavailable)  # refresh: the server is asked


def test_sync_client_works_inside_a_running_event_loop(replica_process: StartProcess) -> None:
    _, port = replica_process("--model", "demo")

    async def notebook_cell() -> tuple[str, str, list[int], int]:
        # What a Jupyter cell does: plain blocking calls while the kernel's loop runs.
        asyncio.get_running_loop()
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            one = client.generate("Hello", model="demo", max_tokens=5)
            streamed = "".join(
                c.text for c in client.stream("Hello", model="demo", max_tokens=5, temperature=0.0)
            )
            batch = client.generate_batch(["a", "b", "c"], model="demo", max_tokens=3)
            first = next(iter(client.iter_batch(["x"] * 100, model="demo", max_tokens=3)))
        return one.text, streamed, [i.index for i in batch if i.ok], first.index

    text, streamed, batch, first = asyncio.run(notebook_cell())
    assert text and streamed and batch == [0, 1, 2] and first == 0


def params(method: object) -> list[tuple[str, object, object, object]]:
    sig = inspect.signature(method)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default, p.annotation) for p in sig.parameters.values()]


def public_methods(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}


@pytest.mark.parametrize(("sync", "twin"), [(Client, AsyncClient), (AdminClient, AsyncAdminClient)])
def test_sync_twin_has_the_async_signatures(sync: type, twin: type) -> None:
    names = public_methods(twin) - {"close"}
    assert names <= public_methods(sync)
    for name in sorted(names):
        assert params(getattr(sync, name)) == params(getattr(twin, name)), name
    assert params(vars(sync)["__init__"]) == params(vars(twin)["__init__"])


async def test_refusals_for_concurrency_are_retried_after_the_servers_retry_info(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    digest = hashlib.sha256(b"k").hexdigest()
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        f'[[tenants]]\nname = "t"\nkeys = ["sha256:{digest}"]\nconcurrent_requests = 2\n'
    )
    router = await start_router(
        await start_replica(demo_spec()),
        auth="api-key",
        tenants_file=str(tenants),
        retry_after_s=0.2,
    )
    async with AsyncClient(f"127.0.0.1:{router.port}", api_key="k", timeout=30) as client:
        options = BatchOptions(concurrency=6, retry=RetryPolicy(max_attempts=50))
        items = await client.generate_batch(
            [f"p {i}" for i in range(60)],
            model="demo",
            max_tokens=16,
            temperature=0.0,
            options=options,
        )
    async with AsyncClient(f"127.0.0.1:{router.port}") as keyless:
        with pytest.raises(errors.Unauthenticated):
            await keyless.generate("x", model="demo")
    assert all(item.ok for item in items)
    assert sum(item.attempts > 1 for item in items) >= 5  # refused, then admitted on retry
