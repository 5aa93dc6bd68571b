"""The router's OpenAI-compatible HTTP front with real clients: the OpenAI Python SDK (sync and
async, streaming, its own exception types), LiteLLM's OpenAI-compatible provider and raw httpx,
against a real router in front of real replicas (tiny CTranslate2 model, loopback).

The router runs on the test's event loop, so sync clients run in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import (
    USER,
    StartReplica,
    StartRouter,
    capture_streams,
    collect,
    demo_spec,
    stub,
    tenants_file,
)

from meshllm.api.errors import Internal, ResourceExhausted
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.client.local import free_port
from meshllm.replica.server import ReplicaServer
from meshllm.replica.types import Chunk, GenerationRequest
from meshllm.router import RouterServer

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM: no internet at import
os.environ.setdefault("LITELLM_OFFLINE_MODE", "True")

CHAT: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def base_url(router: RouterServer) -> str:
    assert router.http_port is not None
    return f"http://127.0.0.1:{router.http_port}/v1"


def sdk(router: RouterServer, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url(router), api_key=key, max_retries=0)


async def http_router(
    start_router: StartRouter, *replicas: ReplicaServer | str, **config: object
) -> RouterServer:
    # stale_after_s: these tests are not about ejection, and a loaded 2-core machine can hold a
    # load report back for seconds
    settings: dict[str, object] = {"http_port": 0, "stale_after_s": 10.0, **config}
    return await start_router(*replicas, **settings)


async def grpc_text(router: RouterServer, **fields: Any) -> gen.GenerateResponse:
    """The same request through the gRPC front, for comparison."""
    channel, client = stub(router.port)
    async with channel:
        response: gen.GenerateResponse = await client.Generate(
            gen.GenerateRequest(model="demo", **fields)
        )
    return response


async def test_openai_sdk_chat_whole_and_streamed_match_the_grpc_reply(
    demo_replica: ReplicaServer, start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    router = await http_router(start_router, demo_replica)
    messages = [gen.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT]
    expected = await grpc_text(router, messages=messages, max_tokens=12, temperature=0.0)
    caplog.set_level(logging.INFO, logger="meshllm.requests")
    async with sdk(router) as client:
        whole = await client.chat.completions.create(
            model="demo",
            messages=CHAT,
            max_tokens=12,
            temperature=0,
        )
        stream = await client.chat.completions.create(
            model="demo",
            messages=CHAT,
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == {1: "stop", 2: "length"}[expected.finish_reason]
    assert whole.usage is not None and whole.usage.completion_tokens == len(expected.token_ids)
    assert whole.usage.prompt_tokens == expected.usage.prompt_tokens
    assert whole.object == "chat.completion" and whole.model == "demo" and whole.id
    # streamed: the same text, a finish reason on the last choice, usage alone at the end
    *content, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == expected.text
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in content) and all(c.id == content[0].id for c in chunks)
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(expected.token_ids)
    # the router's access log: one line per HTTP request, as for gRPC, with its real outcome
    lines = [r for r in caplog.records if r.name == "meshllm.requests" and hasattr(r, "tenant")]
    assert [getattr(r, "request_id", "") for r in lines] == [whole.id, chunks[0].id]
    assert [getattr(r, "code", "") for r in lines] == ["OK", "OK"]


async def test_openai_sdk_sync_client_completions_and_models(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await http_router(start_router, demo_replica)
    expected = await grpc_text(router, prompt="Once upon", max_tokens=8, temperature=0.0)

    def use_sync_sdk() -> tuple[Any, ...]:
        with openai.OpenAI(base_url=base_url(router), api_key="x", max_retries=0) as client:
            whole = client.completions.create(
                model="demo", prompt="Once upon", max_tokens=8, temperature=0
            )
            streamed = list(
                client.completions.create(
                    model="demo", prompt="Once upon", max_tokens=8, temperature=0, stream=True
                )
            )
            listed = client.models.list()
            one = client.models.retrieve("demo")
            with pytest.raises(openai.NotFoundError) as missing:
                client.models.retrieve("nope")
            return whole, streamed, listed, one, missing.value

    whole, streamed, listed, one, missing = await asyncio.to_thread(use_sync_sdk)
    assert whole.object == "text_completion" and whole.choices[0].text == expected.text
    assert whole.usage.total_tokens == expected.usage.total_tokens
    assert "".join(c.choices[0].text for c in streamed) == expected.text
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in listed.data] == ["demo"] and one.id == "demo"
    assert one.model_extra is not None and one.model_extra["ready_replicas"] == 1
    assert missing.status_code == 404 and missing.code == "model_not_found"


async def test_refused_fields_and_bad_input_are_400s_naming_the_field(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await http_router(start_router, demo_replica)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"temperature": -1.0}, "temperature"),  # the replica's check, passed on
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"extra_body": {"top_k": 1}, "something_new": 1}, "extra_body"),
    ]
    async with sdk(router) as client:
        for fields, param in cases:
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(
                    model="demo",
                    messages=CHAT,
                    extra_body=fields,
                )
            assert (e.value.status_code, e.value.param) == (400, param), fields
        with pytest.raises(openai.NotFoundError) as unknown:
            await client.chat.completions.create(model="nope", messages=CHAT)
        long: Any = [{"role": "user", "content": "x" * 3000}]
        with pytest.raises(openai.BadRequestError) as overflow:
            await client.chat.completions.create(model="demo", messages=long)
    assert unknown.value.code == "model_not_found" and "demo" in unknown.value.message
    assert "maximum context length" in overflow.value.message
    async with httpx.AsyncClient(base_url=base_url(router)) as raw:
        broken = await raw.post("/chat/completions", content=b"{not json")
        wrong = await raw.get("/chat/completions")
        nowhere = await raw.get("/nowhere")
        surrogate = await raw.post(
            "/completions", content=b'{"model": "demo", "prompt": "\\ud800"}'
        )
        deep = await raw.post("/completions", content=b"[" * 100_000 + b"]" * 100_000)
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "body"
    for reply in (surrogate, deep):  # never a 500 for what a client sent
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "body"
    assert wrong.status_code == 405 and "error" in wrong.json()
    assert nowhere.status_code == 404 and nowhere.json()["error"]["type"]


async def test_keys_guard_the_http_api_as_they_guard_grpc(
    demo_replica: ReplicaServer, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await http_router(
        start_router, demo_replica, auth="api-key", tenants_file=tenants_file(tmp_path)
    )
    async with sdk(router, "wrong-key") as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(model="demo", messages=CHAT)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    body = {"model": "demo", "messages": CHAT}
    async with httpx.AsyncClient(base_url=base_url(router)) as raw:  # the SDK insists on a key
        missing = await raw.post("/chat/completions", json=body)
        malformed = await raw.post("/chat/completions", json=body, headers={"Authorization": USER})
        undecodable = await raw.post(
            "/chat/completions", json=body, headers={b"Authorization": b"Bearer \xff\xfe"}
        )
    for r in (missing, malformed, undecodable):
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert "missing API key" in missing.json()["error"]["message"]
    async with sdk(router, USER) as client:
        ok = await client.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
        assert [m.id for m in (await client.models.list()).data] == ["demo"]
    assert ok.choices[0].message.content is not None
    async with httpx.AsyncClient() as raw:  # probes need no key
        health = await raw.get(f"http://127.0.0.1:{router.http_port}/health")
        ready = await raw.get(f"http://127.0.0.1:{router.http_port}/health/ready")
    assert (health.status_code, ready.status_code) == (200, 200)


async def test_quota_429_carries_retry_after_and_rate_limit_headers(
    demo_replica: ReplicaServer, start_router: StartRouter, tmp_path: Path
) -> None:
    n = 3
    router = await http_router(
        start_router,
        demo_replica,
        auth="api-key",
        tenants_file=tenants_file(tmp_path, requests_per_minute=n, tokens_per_minute=100_000),
    )
    body = {"model": "demo", "messages": CHAT, "max_tokens": 2}
    headers = {"Authorization": f"Bearer {USER}"}
    async with httpx.AsyncClient(base_url=base_url(router), headers=headers) as raw:
        replies = await asyncio.gather(
            *(raw.post("/chat/completions", json=body) for _ in range(3 * n))
        )
    admitted = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code == 429]
    assert len(admitted) == n and len(refused) == 2 * n
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining == list(range(n))
    assert {r.headers["x-ratelimit-limit-requests"] for r in admitted} == {str(n)}
    assert {r.headers["x-ratelimit-limit-tokens"] for r in admitted} == {"100000"}
    for r in refused:
        error = r.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "requests per minute" in error["message"]
        retry = int(r.headers["Retry-After"])
        assert 1 <= retry <= 60 and 0 < float(r.headers["x-ratelimit-reset-requests"]) <= 60 / n
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.headers["x-ratelimit-limit-requests"] == str(n)
        assert 0 < int(r.headers["retry-after-ms"]) <= retry * 1000
    async with sdk(router, USER) as client:  # the SDK's own type, with the headers
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
    assert limited.value.status_code == 429 and "retry-after" in limited.value.response.headers


async def test_http_client_disconnect_stops_generation_on_the_replica(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    """As test_client_cancel_stops_generation_on_the_replica, through the HTTP front; the
    tenant's quota is settled with what was really generated."""
    server = await start_replica(demo_spec(id="bench", path="bench"))
    streams = capture_streams(server)
    router = await http_router(
        start_router,
        server,
        auth="api-key",
        tenants_file=tenants_file(tmp_path, tokens_per_day=1_000_000),
    )
    body = {"model": "bench", "prompt": "long", "max_tokens": 2000, "stream": True}
    received = 0
    async with (
        httpx.AsyncClient(base_url=base_url(router)) as raw,
        raw.stream(
            "POST", "/completions", json=body, headers={"Authorization": f"Bearer {USER}"}
        ) as reply,
    ):
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line.startswith("data: "):
                received += 1  # each event holds at least one token
            if received >= 5:
                break
    await asyncio.sleep(0.5)
    (stream,) = streams
    assert stream.cancelled and stream.produced < 2000
    print(f"tokens produced after the disconnect: {stream.produced - received}")
    assert stream.produced - received < 300
    assert server.replica is not None and server.replica.load_report().running == 0
    assert all(r.inflight == 0 for r in router.registry.replicas.values())


async def test_a_whole_reply_whose_client_left_is_cancelled_too(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    server = await start_replica(demo_spec(engine="fake", options={"token_delay_ms": "5"}))
    streams = capture_streams(server)
    router = await http_router(start_router, server)
    async with httpx.AsyncClient(base_url=base_url(router), timeout=0.3) as raw:
        with pytest.raises(httpx.ReadTimeout):
            await raw.post(
                "/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2000}
            )
    await asyncio.sleep(0.3)
    (stream,) = streams
    assert stream.cancelled and stream.done and stream.generated < 200


async def test_a_stream_broken_after_its_first_token_ends_with_an_error_event(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    async def break_midway(original: Any, req: GenerationRequest) -> AsyncIterator[Chunk]:
        count = 0
        async for chunk in original(req):
            yield chunk
            count += 1
            if count == 2:
                raise Internal("engine crashed")

    assert demo_replica.replica is not None
    original = demo_replica.replica.generate
    demo_replica.replica.generate = lambda req: break_midway(original, req)  # type: ignore[method-assign]
    router = await http_router(start_router, demo_replica)
    body = {
        "model": "demo",
        "messages": CHAT,
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
    }
    async with httpx.AsyncClient(base_url=base_url(router)) as raw:
        reply = await raw.post("/chat/completions", json=body)
    events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    assert reply.status_code == 200 and "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "stream_interrupted" and "incomplete" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-1]) and len(events) >= 2
    async with sdk(router) as client:  # the SDK raises on it rather than ending quietly
        stream = await client.chat.completions.create(
            model="demo", messages=CHAT, max_tokens=200, temperature=0, stream=True
        )
        with pytest.raises(openai.APIError, match="incomplete"):
            async for _ in stream:
                pass


async def test_failure_before_the_first_token_moves_to_another_replica(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    full, ok = await start_replica(demo_spec()), await start_replica(demo_spec())

    async def refuse(original: Any, req: GenerationRequest) -> AsyncIterator[Chunk]:
        raise ResourceExhausted("queue full", retry_after=1.0)
        yield  # an async generator, like the real one

    assert full.replica is not None
    full.replica.generate = lambda req: refuse(None, req)  # type: ignore[method-assign]
    router = await http_router(start_router, full, ok, policy="round-robin", metrics_port=0)
    async with sdk(router) as client:
        for i in range(4):
            whole = await client.completions.create(model="demo", prompt=f"p{i}", max_tokens=2)
            stream = await client.completions.create(
                model="demo", prompt=f"p{i}", max_tokens=2, stream=True
            )
            chunks = [c async for c in stream]
            assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    retried = await asyncio.to_thread(_scrape_retries, router)
    assert retried >= 4  # each request that met the full replica first went on to the other


def _scrape_retries(router: RouterServer) -> float:
    assert router.metrics_port is not None
    text = httpx.get(f"http://127.0.0.1:{router.metrics_port}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("meshllm_router_retries_total{")
    )


async def test_the_deadline_is_504_or_ends_the_stream_with_an_error(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    server = await start_replica(demo_spec(engine="fake", options={"token_delay_ms": "5"}))
    streams = capture_streams(server)
    router = await http_router(start_router, server, http_timeout_s=0.4)
    body = {"model": "demo", "prompt": "x", "max_tokens": 2000}
    async with httpx.AsyncClient(base_url=base_url(router)) as raw:
        whole = await raw.post("/completions", json=body)
        streamed = await raw.post("/completions", json={**body, "stream": True})
    assert whole.status_code == 504 and whole.json()["error"]["type"] == "timeout"
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["type"] == "timeout"
    await asyncio.sleep(0.2)
    assert [s.cancelled and s.done and s.generated < 200 for s in streams] == [True, True]


async def test_a_burst_of_new_connections_is_served_whole(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    """As batch clients send them: 64 requests at once, each on a connection of its own (one
    httpx client that keeps no connection alive: 64 clients would each build an SSL context on
    the test's event loop, which the router and replica share)."""
    router = await http_router(start_router, demo_replica)
    body = {"model": "demo", "prompt": "hi", "max_tokens": 2}
    no_reuse = httpx.Limits(max_keepalive_connections=0, max_connections=None)
    async with httpx.AsyncClient(base_url=base_url(router), limits=no_reuse, timeout=60) as raw:
        replies = await asyncio.gather(*(raw.post("/completions", json=body) for _ in range(64)))
    assert [r.status_code for r in replies] == [200] * 64, replies[0].text
    assert {r.json()["usage"]["completion_tokens"] for r in replies} == {2}
    assert len({r.json()["id"] for r in replies}) == 64


async def test_no_replica_is_503_with_retry_after(start_router: StartRouter) -> None:
    router = await http_router(start_router, f"127.0.0.1:{free_port()}", ready=0, retry_after_s=3.0)
    async with sdk(router) as client:
        with pytest.raises(openai.InternalServerError) as e:
            await client.chat.completions.create(model="demo", messages=CHAT)
    assert e.value.status_code == 503 and e.value.response.headers["Retry-After"] == "3"
    assert e.value.code == "no_healthy_replica"
    async with httpx.AsyncClient() as raw:
        ready = await raw.get(f"http://127.0.0.1:{router.http_port}/health/ready")
    assert ready.status_code == 503


async def test_litellm_openai_compatible_provider_completes_and_streams(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    import litellm

    router = await http_router(start_router, demo_replica)
    expected = await grpc_text(
        router,
        messages=[gen.ChatMessage(role="user", content="Hello there")],
        max_tokens=8,
        temperature=0.0,
    )
    ask: dict[str, Any] = {
        "model": "openai/demo",
        "api_base": base_url(router),
        "api_key": "unused",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 8,
        "temperature": 0,
    }

    def use_litellm() -> tuple[Any, str]:
        whole = litellm.completion(**ask)
        streamed = "".join(
            chunk.choices[0].delta.content or "" for chunk in litellm.completion(**ask, stream=True)
        )
        return whole, streamed

    whole, streamed = await asyncio.to_thread(use_litellm)
    assert whole.choices[0].message.content == expected.text == streamed
    assert whole.usage.completion_tokens == len(expected.token_ids)


async def test_trace_context_and_request_id_come_from_the_http_headers(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await http_router(start_router, demo_replica, http_max_body_bytes=2000)
    body = {"model": "demo", "prompt": "hi", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=base_url(router)) as raw:
        named = await raw.post("/completions", json=body, headers={"X-Request-Id": "job-7.item-1"})
        bad = await raw.post("/completions", json=body, headers={"X-Request-Id": "a b;c"})
        big = await raw.post("/completions", json={**body, "prompt": "x" * 3000})
    assert named.json()["id"] == "job-7.item-1" == named.headers["x-request-id"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-request-id"
    assert big.status_code == 413 and "2000 bytes" in big.json()["error"]["message"]
    # the gRPC front is still there, on the same router
    channel, client = stub(router.port)
    async with channel:
        chunks = await collect(client.GenerateStream(gen.GenerateRequest(model="demo", prompt="x")))
    assert chunks[-1].finish_reason != gen.FINISH_REASON_UNSPECIFIED
