"""The stub examples (examples/stubs/python, sync and grpc.aio) against a real router with API
keys and quotas, in front of a real replica on the tiny demo model.

The sync examples block, so they run in a worker thread while the servers run on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import meshllm_stubs_aio_example as aio_ex
import meshllm_stubs_example as ex
import pytest
from conftest import (
    USER,
    StartReplica,
    StartRouter,
    bearer,
    capture_streams,
    demo_spec,
    keyed_router,
    one_slot_router,
    stub,
)

from meshllm.api.v1 import generation_pb2 as pb
from meshllm.router import RouterServer

T = TypeVar("T")
ONE_PER_CHUNK = pb.StreamOptions(coalesce_tokens=1)


async def in_thread(example: Callable[..., T], router: RouterServer, **kwargs: Any) -> T:
    """Run a sync example on a fresh channel to ``router``, off the event loop."""

    def call() -> T:
        channel, stub = ex.connect(f"127.0.0.1:{router.port}")
        with channel:
            return example(stub, **kwargs)

    return await asyncio.to_thread(call)


async def failed(
    example: Callable[..., object], router: RouterServer, **kwargs: Any
) -> ex.CallFailed:
    with pytest.raises(ex.CallFailed) as raised:
        await in_thread(example, router, **kwargs)
    return raised.value


def request(**fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="demo", prompt="hello", **fields)


async def test_sync_stream_returns_the_whole_reply_and_the_rate_limits(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await keyed_router(start_replica, start_router, tmp_path, requests_per_minute=60)
    seen: list[str] = []
    reply = await in_thread(
        ex.stream,
        router,
        request=request(max_tokens=12, stream_options=ONE_PER_CHUNK),
        api_key=USER,
        timeout_s=30,
        on_text=seen.append,
    )
    assert len(seen) >= 2 and reply.text == "".join(seen)
    assert reply.finish_reason in {"FINISH_REASON_STOP", "FINISH_REASON_LENGTH"}
    assert 0 < reply.completion_tokens <= 12
    assert reply.rate_limits["x-ratelimit-limit-requests"] == "60"
    assert reply.rate_limits["x-ratelimit-remaining-requests"] == "59"
    assert float(reply.rate_limits["x-ratelimit-reset-requests"]) > 0


async def test_sync_errors_decode_badrequest_and_unauthenticated(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await keyed_router(start_replica, start_router, tmp_path)
    bad = await failed(
        ex.generate, router, request=request(temperature=-1.0), api_key=USER, timeout_s=30
    )
    assert bad.failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad.failure.field_violations] == ["temperature"]
    unknown = await failed(
        ex.stream, router, request=request(), api_key="no-such-key", timeout_s=30, on_text=print
    )
    assert unknown.failure.code == grpc.StatusCode.UNAUTHENTICATED
    assert unknown.partial_text == ""


async def test_sync_generate_waits_out_a_real_quota_refusal_by_its_retryinfo(
    start_replica: StartReplica,
    start_router: StartRouter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = await one_slot_router(start_replica, start_router, tmp_path)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    channel, client = stub(router.port)
    async with channel:
        held = client.GenerateStream(request(max_tokens=2000), metadata=bearer(USER))  # ~10 s
        await held.read()  # the tenant's one slot is taken
        with caplog.at_level(logging.INFO, logger="meshllm.requests"):
            retrying = asyncio.create_task(
                in_thread(
                    ex.generate,
                    router,
                    request=request(max_tokens=4),
                    api_key=USER,
                    timeout_s=30,
                    sleep=sleep,
                )
            )
            for _ in range(1500):  # until the router has refused the example's call (up to 30 s)
                if any(getattr(r, "code", "") == "RESOURCE_EXHAUSTED" for r in caplog.records):
                    break
                await asyncio.sleep(0.02)
            held.cancel()  # the slot frees; the next retry fits
            reply = await retrying
    assert 0 < reply.completion_tokens <= 4
    # refused at least once, and each wait is the router's RetryInfo plus at most 20 % jitter
    assert sleeps and all(0.3 <= s <= 0.3 * 1.2 for s in sleeps), sleeps


async def test_sync_quota_refusal_decodes_errorinfo_retryinfo_and_quotafailure(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await keyed_router(start_replica, start_router, tmp_path, requests_per_minute=1)
    await in_thread(ex.generate, router, request=request(max_tokens=2), api_key=USER, timeout_s=30)
    # RetryInfo says about a minute: more than the 2 s deadline, so no retry
    refused = await failed(ex.generate, router, request=request(), api_key=USER, timeout_s=2)
    assert refused.failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.failure.reason == "QUOTA_EXCEEDED"
    assert refused.failure.error_metadata["tenant"] == "batch"
    assert refused.failure.retry_after_s is not None and 1 < refused.failure.retry_after_s <= 60
    assert [s for s, _ in refused.failure.quota_violations] == ["tenant:batch"]


async def test_sync_first_chunks_cancels_generation_on_the_replica(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    server = await start_replica(demo_spec(id="bench", path="bench"))
    streams = capture_streams(server)
    router = await start_router(server)
    text = await in_thread(
        ex.first_chunks,
        router,
        request=pb.GenerateRequest(
            model="bench", prompt="long", max_tokens=2000, stream_options=ONE_PER_CHUNK
        ),
        api_key="",  # a router without authentication ignores the key
        timeout_s=30,
        chunks=3,
    )
    assert text
    (stream,) = streams
    for _ in range(500):  # the cancel reaches the engine within a few steps: wait up to 10 s
        if stream.done:
            break
        await asyncio.sleep(0.02)
    assert stream.cancelled and stream.produced < 2000


async def test_sync_deadline_is_deadline_exceeded(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    router = await start_router(await start_replica(demo_spec(engine="fake")))
    error = await failed(
        ex.stream,
        router,
        request=request(max_tokens=2000),
        api_key="",
        timeout_s=0.001,
        on_text=print,
    )
    assert error.failure.code == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_aio_stream_cancel_and_errors(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await keyed_router(start_replica, start_router, tmp_path, tokens_per_minute=10_000)
    channel, stub = aio_ex.connect(f"127.0.0.1:{router.port}")
    async with channel:
        seen: list[str] = []
        reply = await aio_ex.stream(
            stub,
            request(max_tokens=12, stream_options=ONE_PER_CHUNK),
            api_key=USER,
            timeout_s=30,
            on_text=seen.append,
        )
        assert reply.text == "".join(seen) and 0 < reply.completion_tokens <= 12
        assert reply.rate_limits["x-ratelimit-limit-tokens"] == "10000"
        first = await aio_ex.first_chunks(
            stub,
            # greedy: the random demo model's first two tokens, sampled, may be the start of one
            # multi-byte character (no text yet); its greedy ones are whole characters
            request(max_tokens=200, temperature=0.0, stream_options=ONE_PER_CHUNK),
            api_key=USER,
            timeout_s=30,
            chunks=2,
        )
        assert first
        with pytest.raises(ex.CallFailed) as raised:
            await aio_ex.stream(
                stub,
                request(max_tokens=20_000),  # more than the tenant's tokens per minute
                api_key=USER,
                timeout_s=30,
                on_text=seen.append,
            )
    failure = raised.value.failure
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.reason == "REQUEST_EXCEEDS_QUOTA"
    assert [f for f, _ in failure.field_violations] == ["max_tokens"]
    assert [s for s, _ in failure.quota_violations] == ["tenant:batch"]
