"""Integration tests: a real grpc.aio replica on loopback with the real tiny CTranslate2 model."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import ctranslate2
import grpc
import pytest
from conftest import StartReplica, cancel_after, capture_streams, collect, demo_spec, stub
from tokenizers import Tokenizer

from meshllm.api.errors import from_rpc_error
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.replica.server import ReplicaServer

PROMPTS = [f"prompt number {i}: " + "abc " * (i % 7) for i in range(32)]


def reference_greedy(demo_dir: Path, prompt: str, max_tokens: int) -> list[int]:
    """The prompt generated alone, straight through CTranslate2 (no replica code involved)."""
    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    generator = ctranslate2.Generator(str(demo_dir), compute_type="float32")
    try:
        tokens = [tok.id_to_token(i) for i in tok.encode(prompt).ids]
        result = generator.generate_batch(
            [tokens], max_length=max_tokens, sampling_topk=1, include_prompt_in_result=False
        )
        ids: list[int] = result[0].sequences_ids[0]
        return ids
    finally:
        generator.unload_model()


async def test_32_concurrent_streams_match_greedy_generation_alone(
    demo_replica: ReplicaServer, demo_dir: Path
) -> None:
    channel, client = stub(demo_replica.port)
    async with channel:
        calls = [
            collect(
                client.GenerateStream(
                    gen.GenerateRequest(model="demo", prompt=p, temperature=0.0, max_tokens=40)
                )
            )
            for p in PROMPTS
        ]
        results = await asyncio.gather(*calls)
    for prompt, chunks in zip(PROMPTS, results, strict=True):
        ids = [t for c in chunks for t in c.token_ids]
        assert ids == reference_greedy(demo_dir, prompt, 40), prompt
        final = chunks[-1]
        assert final.finish_reason == gen.FINISH_REASON_LENGTH
        assert final.usage.completion_tokens == 40
        assert final.usage.prompt_tokens == len(prompt.encode()) + 1  # bytes + BOS
        assert final.timing.replica == "r0"
        assert final.timing.time_to_first_token_ms > 0
        assert all(c.finish_reason == gen.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


async def test_text_deltas_join_to_the_decoded_tokens(
    demo_replica: ReplicaServer, demo_dir: Path
) -> None:
    channel, client = stub(demo_replica.port)
    async with channel:
        resp = await client.Generate(
            gen.GenerateRequest(model="demo", prompt="hello", max_tokens=64, seed=7)
        )
    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    assert resp.text == tok.decode(list(resp.token_ids))
    assert len(resp.token_ids) == resp.usage.completion_tokens == 64


async def test_stop_string_ends_generation_before_it(
    demo_replica: ReplicaServer, demo_dir: Path
) -> None:
    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    full = tok.decode(reference_greedy(demo_dir, "stop test", 60))
    stop = full[20:23]
    expected = full[: full.index(stop)]
    channel, client = stub(demo_replica.port)
    async with channel:
        chunks = await collect(
            client.GenerateStream(
                gen.GenerateRequest(
                    model="demo", prompt="stop test", temperature=0.0, max_tokens=60, stop=[stop]
                )
            )
        )
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == gen.FINISH_REASON_STOP
    assert chunks[-1].stop_sequence == stop


async def test_chat_messages_use_the_chat_template(demo_replica: ReplicaServer) -> None:
    channel, client = stub(demo_replica.port)
    messages = [gen.ChatMessage(role="user", content="hi")]
    async with channel:
        resp = await client.Generate(
            gen.GenerateRequest(
                model="demo", messages=messages, instructions="be brief", max_tokens=4
            )
        )
    rendered = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    specials = (
        1 + rendered.count("<|im_start|>") + rendered.count("<|im_end|>")
    )  # BOS + chat markers
    plain = rendered.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert (
        resp.usage.prompt_tokens == len(plain.encode()) + specials
    )  # byte-level: a token per byte


async def test_client_cancel_stops_generation_within_a_few_tokens(
    start_replica: StartReplica,
) -> None:
    # The bench model (int8, d256, 4 layers) runs at a few thousand tokens/s, like a small real
    # model; the demo model is so fast that a millisecond is dozens of tokens.
    server = await start_replica(demo_spec(id="bench", path="bench"))
    streams = capture_streams(server)
    received = await cancel_after(
        server.port, gen.GenerateRequest(model="bench", prompt="long", max_tokens=2000), tokens=5
    )
    (stream,) = streams
    assert stream.cancelled
    produced_after = stream.produced - received
    assert stream.produced < 2000
    print(f"tokens produced after the cancel: {produced_after}")
    assert produced_after < 30, f"engine produced {produced_after} tokens after the cancel"
    assert server.replica is not None
    assert server.replica.load_report().running == 0


async def test_deadline_expiry_returns_deadline_exceeded_and_stops_the_engine(
    start_replica: StartReplica,
) -> None:
    # The fake engine at 5 ms a token makes the deadline certain to pass mid-stream; the
    # deadline path (gRPC cancels the handler, the handler cancels the engine) is engine-agnostic.
    server = await start_replica(demo_spec(engine="fake", options={"token_delay_ms": "5"}))
    streams = capture_streams(server)
    channel, client = stub(server.port)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await collect(
                client.GenerateStream(
                    gen.GenerateRequest(model="demo", prompt="x", max_tokens=2000), timeout=0.2
                )
            )
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.2)
    (stream,) = streams
    assert stream.cancelled and stream.done
    assert stream.generated < 100  # about 40 tokens fit in 0.2 s; then the engine stopped


async def test_an_unload_past_its_drain_timeout_ends_its_streams_with_an_error(
    start_replica: StartReplica,
) -> None:
    """What the replica cuts short itself is UNAVAILABLE: STREAM_INTERRUPTED after tokens went
    out, REPLICA_DRAINING (retry elsewhere) before any did; never OK with finish cancelled."""
    spec = demo_spec(engine="fake", max_batch_size=1, inter_threads=1)
    server = await start_replica(replace(spec, options={"token_delay_ms": "5"}))
    assert server.replica is not None
    channel, client = stub(server.port)
    async with channel:
        request = gen.GenerateRequest(model="demo", prompt="x", max_tokens=2000)
        running = client.GenerateStream(request)
        first = await running.read()  # generating; the next one waits behind it (batch of 1)
        queued = client.Generate(gen.GenerateRequest(model="demo", prompt="y", max_tokens=5))
        await asyncio.sleep(0.05)
        await server.replica.unload(drain_timeout_s=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            while await running.read() != grpc.aio.EOF:
                pass
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await queued
    assert isinstance(first, gen.GenerateChunk) and first.token_ids
    for failure, reason in ((cut, "STREAM_INTERRUPTED"), (refused, "REPLICA_DRAINING")):
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert from_rpc_error(failure.value).reason == reason


async def test_slow_consumer_does_not_block_other_streams(demo_replica: ReplicaServer) -> None:
    channel, client = stub(demo_replica.port)
    async with channel:
        slow = client.GenerateStream(
            gen.GenerateRequest(model="demo", prompt="slow", max_tokens=1500, temperature=0.0)
        )
        slow_chunks = []
        async for chunk in slow:
            slow_chunks.append(chunk)
            break
        started = time.perf_counter()
        others = await asyncio.gather(
            *[
                client.Generate(
                    gen.GenerateRequest(
                        model="demo", prompt=f"fast {i}", max_tokens=32, temperature=0.0
                    )
                )
                for i in range(8)
            ]
        )
        fast_elapsed = time.perf_counter() - started
        await asyncio.sleep(1.0)  # stall: the engine runs ahead of the reader
        async for chunk in slow:  # the slow reader now drains what piled up
            slow_chunks.append(chunk)
            await asyncio.sleep(0.02)
    assert all(o.usage.completion_tokens == 32 for o in others)
    assert fast_elapsed < 5.0
    tokens = sum(len(c.token_ids) for c in slow_chunks)
    assert tokens == 1500
    # gRPC's flow-control window absorbs the first chunks; once it is full, tokens pile up in the
    # replica and go out several per chunk.
    assert len(slow_chunks) < tokens, (
        "tokens should coalesce into fewer chunks for a stalled reader"
    )


async def test_coalesce_option_batches_tokens_per_chunk(demo_replica: ReplicaServer) -> None:
    channel, client = stub(demo_replica.port)
    async with channel:
        chunks = await collect(
            client.GenerateStream(
                gen.GenerateRequest(
                    model="demo",
                    prompt="c",
                    max_tokens=64,
                    temperature=0.0,  # sampled, the random demo model may draw end-of-sequence
                    stream_options=gen.StreamOptions(coalesce_tokens=8),
                )
            )
        )
    sizes = [len(c.token_ids) for c in chunks if c.token_ids]
    assert sum(sizes) == 64
    assert all(s >= 8 for s in sizes[1:-1])  # the first chunk is sent without waiting for 8


def _status(e: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, set[str], str]:
    err = from_rpc_error(e)
    return err.code, {v.field for v in err.field_violations}, err.reason


BAD_REQUESTS = [
    (gen.GenerateRequest(model="demo"), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (gen.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, ""),
    (
        gen.GenerateRequest(model="demo", prompt="x", temperature=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
    ),
    (
        gen.GenerateRequest(model="demo", prompt="x", top_p=1.5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p",
    ),
    (
        gen.GenerateRequest(model="demo", prompt="x", top_k=100000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k",
    ),
    (
        gen.GenerateRequest(model="demo", prompt="x", max_tokens=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens",
    ),
    (
        gen.GenerateRequest(model="demo", prompt="x", max_tokens=100),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens",
    ),
    (
        gen.GenerateRequest(model="demo", prompt="x" * 200),
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt",
    ),
    (
        gen.GenerateRequest(model="demo", prompt="x", token_ids=[5]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "token_ids",
    ),
    (
        gen.GenerateRequest(model="demo", token_ids=[10**6]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "token_ids[0]",
    ),
    (
        gen.GenerateRequest(model="demo", prompt="x", stop=[""]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "stop[0]",
    ),
    (
        gen.GenerateRequest(model="demo", messages=[gen.ChatMessage(content="x")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[0].role",
    ),
]


async def test_every_bad_input_gets_its_status_and_the_replica_keeps_serving(
    start_replica: StartReplica,
) -> None:
    server = await start_replica(demo_spec(context_length=128, max_tokens_limit=64))
    channel, client = stub(server.port)
    async with channel:
        background = asyncio.ensure_future(
            client.Generate(gen.GenerateRequest(model="demo", prompt="busy", max_tokens=64))
        )
        for request, code, field in BAD_REQUESTS:
            for call in (client.Generate, lambda r: collect(client.GenerateStream(r))):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(request)
                got_code, fields, _ = _status(e.value)
                assert got_code == code, (request, e.value.details())
                if field:
                    assert field in fields, (request, fields)
        with pytest.raises(grpc.aio.AioRpcError) as e:  # bigger than the 4 MiB message limit
            await client.Generate(gen.GenerateRequest(model="demo", prompt="y" * (5 * 1024 * 1024)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await background).usage.completion_tokens == 64
        ok = await client.Generate(
            gen.GenerateRequest(model="demo", prompt="still fine", max_tokens=8), timeout=10
        )
    assert ok.usage.completion_tokens == 8


async def test_request_without_a_loaded_model_is_failed_precondition(
    start_replica: StartReplica,
) -> None:
    server = await start_replica(None)
    channel, client = stub(server.port)
    async with channel:
        for model in ("demo", "other"):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.Generate(gen.GenerateRequest(model=model, prompt="x"))
            err = from_rpc_error(e.value)
            assert (err.code, err.reason) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "MODEL_NOT_LOADED",
            )
            assert "no model is loaded" in err.message
        assert (await client.ListModels(gen.ListModelsRequest())).models == []


async def test_list_models_reports_limits(start_replica: StartReplica) -> None:
    server = await start_replica(demo_spec(context_length=512, max_tokens_limit=100))
    channel, client = stub(server.port)
    async with channel:
        (model,) = (await client.ListModels(gen.ListModelsRequest())).models
    assert (model.id, model.engine, model.context_length, model.max_tokens_limit) == (
        "demo",
        "ctranslate2",
        512,
        100,
    )


async def test_queue_limit_returns_resource_exhausted_with_retry_info(
    start_replica: StartReplica,
) -> None:
    server = await start_replica(demo_spec(max_queued=1, inter_threads=1, max_batch_size=1))
    channel, client = stub(server.port)
    async with channel:
        calls = [
            client.Generate(
                gen.GenerateRequest(
                    model="demo", prompt=f"q{i}", max_tokens=300, temperature=0.5 + i / 100
                )
            )
            for i in range(6)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    errors = [from_rpc_error(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert errors, "with one slot and a queue of one, some of 6 concurrent requests must be refused"
    assert all(
        e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "QUEUE_FULL" for e in errors
    )
    assert all(e.retry_after is not None and e.retry_after > 0 for e in errors)
    assert any(isinstance(r, gen.GenerateResponse) for r in results)


async def test_the_generation_configs_eos_ids_end_a_completion(
    start_replica: StartReplica, demo_dir: Path, tmp_path: Path
) -> None:
    """Llama 3 ends a chat turn with ``<|eot_id|>``, which is not its tokenizer's eos_token but
    is in ``generation_config.json``: a completion must stop there, not run to max_tokens."""
    greedy = reference_greedy(demo_dir, "eos test", 40)
    eot = greedy[10]
    stops_at = greedy.index(eot)
    folder = tmp_path / "with-eot"
    shutil.copytree(demo_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eot]}))
    replica = await start_replica(demo_spec(id="eot", path=str(folder)))
    channel, client = stub(replica.port)
    async with channel:
        chunks = await collect(
            client.GenerateStream(
                gen.GenerateRequest(model="eot", prompt="eos test", temperature=0.0, max_tokens=40)
            )
        )
    assert [i for c in chunks for i in c.token_ids] == greedy[:stops_at]
    assert chunks[-1].finish_reason == gen.FINISH_REASON_STOP

    (folder / "generation_config.json").write_text('{"eos_token_id": "<|eot_id|>"}')
    assert replica.replica is not None
    await replica.replica.unload(drain_timeout_s=1.0)
    await replica.replica.load(demo_spec(id="eot", path=str(folder)), wait=True)
    assert replica.replica.state.value == "failed"
    assert "eos_token_id must be an id or a list of ids" in replica.replica.error
