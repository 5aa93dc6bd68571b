"""The Node example (examples/stubs/node: @grpc/grpc-js + @grpc/proto-loader) as a real node
process against a real router with API keys and quotas: stream, decoded error details, retry by
RetryInfo, cancel. ``make setup`` installs its npm packages (``npm ci``); a missing node or
missing packages fail these tests rather than skip them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

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

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router import RouterServer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stubs" / "node"
ONE_PER_CHUNK = {"coalesce_tokens": 1}


async def node(
    command: str,
    router: RouterServer,
    request: dict[str, Any],
    api_key: str = USER,
    **options: Any,
) -> dict[str, Any]:
    """Run one command of the example; its one line of JSON, decoded. The key goes in the
    environment, never on the command line."""
    binary = shutil.which("node")
    assert binary, "node is not installed"
    assert (EXAMPLE / "node_modules").is_dir(), "the example's npm packages: run `make setup`"
    proc = await asyncio.create_subprocess_exec(
        binary,
        str(EXAMPLE / "meshllm_stubs_example.js"),
        command,
        f"127.0.0.1:{router.port}",
        json.dumps(request),
        json.dumps(options),
        env={**os.environ, "MESHLLM_API_KEY": api_key},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    result: dict[str, Any] = json.loads(out)
    assert proc.returncode == (0 if result["ok"] else 1), err.decode()
    return result


async def test_node_streams_a_reply_with_its_rate_limits(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await keyed_router(start_replica, start_router, tmp_path, requests_per_minute=60)
    request = {
        "model": "demo",
        "prompt": "hello",
        "max_tokens": 12,
        "stream_options": ONE_PER_CHUNK,
    }
    streamed = await node("stream", router, request)
    assert streamed["ok"], streamed
    reply = streamed["reply"]
    assert len(streamed["texts"]) >= 2 and reply["text"] == "".join(streamed["texts"])
    assert reply["finish_reason"] in {"FINISH_REASON_STOP", "FINISH_REASON_LENGTH"}
    assert 0 < reply["completion_tokens"] <= 12
    assert reply["rate_limits"]["x-ratelimit-limit-requests"] == "60"
    assert reply["rate_limits"]["x-ratelimit-remaining-requests"] == "59"


async def test_node_generate_waits_by_retryinfo_until_the_tenant_has_room(
    start_replica: StartReplica,
    start_router: StartRouter,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = await one_slot_router(start_replica, start_router, tmp_path)
    channel, client = stub(router.port)
    async with channel:
        held = client.GenerateStream(
            gen.GenerateRequest(model="demo", prompt="hold", max_tokens=2000),  # ~10 s
            metadata=bearer(USER),
        )
        await held.read()  # the tenant's one slot is taken
        with caplog.at_level(logging.INFO, logger="meshllm.requests"):
            retrying = asyncio.create_task(
                node("generate", router, {"model": "demo", "prompt": "hi", "max_tokens": 4})
            )
            for _ in range(1500):  # until the router has refused the node call (up to 30 s)
                if any(getattr(r, "code", "") == "RESOURCE_EXHAUSTED" for r in caplog.records):
                    break
                await asyncio.sleep(0.02)
            held.cancel()  # the slot frees; the next retry fits
            result = await retrying
    assert result["ok"], result
    assert result["sleeps"] and all(0.3 <= s <= 0.3 * 1.2 for s in result["sleeps"]), result


async def test_node_decodes_every_error_detail(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await keyed_router(
        start_replica, start_router, tmp_path, requests_per_minute=1, tokens_per_minute=1000
    )
    too_big = await node("stream", router, {"model": "demo", "prompt": "hi", "max_tokens": 5000})
    failure = too_big["failure"]
    assert (failure["code"], failure["reason"]) == ("INVALID_ARGUMENT", "REQUEST_EXCEEDS_QUOTA")
    assert [f for f, _ in failure["field_violations"]] == ["max_tokens"]
    assert [s for s, _ in failure["quota_violations"]] == ["tenant:batch"]
    assert too_big["partial_text"] == ""
    request = {"model": "demo", "prompt": "hi", "max_tokens": 2}
    assert (await node("generate", router, request))["ok"]  # the minute's one request
    refused = await node("generate", router, request, attempts=1)
    failure = refused["failure"]
    assert (failure["code"], failure["reason"]) == ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED")
    assert failure["error_metadata"]["tenant"] == "batch"
    assert 0 < failure["retry_after_s"] <= 60
    assert [s for s, _ in failure["quota_violations"]] == ["tenant:batch"]
    assert "requests_per_minute" in failure["quota_violations"][0][1]
    # waiting out RetryInfo (about a minute) would pass the 2 s deadline: no wait, no retry
    hopeless = await node("generate", router, request, timeout_s=2)
    assert hopeless["failure"]["code"] == "RESOURCE_EXHAUSTED" and hopeless["sleeps"] == []


async def test_node_first_chunks_cancels_generation_on_the_replica(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    server = await start_replica(demo_spec(id="bench", path="bench"))
    streams = capture_streams(server)
    router = await start_router(server)  # no authentication: the key is ignored
    request = {
        "model": "bench",
        "prompt": "long",
        "max_tokens": 2000,
        "stream_options": ONE_PER_CHUNK,
    }
    result = await node("first-chunks", router, request, chunks=3)
    assert result["ok"] and result["reply"], result
    (stream,) = streams
    for _ in range(500):  # the cancel reaches the engine within a few steps: wait up to 10 s
        if stream.done:
            break
        await asyncio.sleep(0.02)
    assert stream.cancelled and stream.produced < 2000


async def test_node_reports_an_unknown_key_as_unauthenticated(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await keyed_router(start_replica, start_router, tmp_path)
    result = await node("stream", router, {"model": "demo", "prompt": "hi"}, api_key="wrong")
    assert result["failure"]["code"] == "UNAUTHENTICATED", result
    assert result["failure"]["reason"] == "" and result["failure"]["retry_after_s"] is None
