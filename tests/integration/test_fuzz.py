"""Fuzzing a real replica and a real router: malformed bytes, every request field at and past
its bounds. No reply may be UNKNOWN or INTERNAL (a caller's bytes are never a server bug), and
both servers answer health checks and serve a normal request afterwards."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
from conftest import StartReplica, StartRouter, demo_spec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshllm.api.v1 import generation_pb2 as gen

METHODS = ("/meshllm.api.v1.Generation/Generate", "/meshllm.api.v1.Generation/GenerateStream")
SERVER_BUGS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
STRING_FIELDS = {"model": 1, "prompt": 2, "instructions": 5, "stop": 15, "request_id": 20}
BASE: dict[str, Any] = {"model": "demo", "prompt": "fuzz", "max_tokens": 2}


def field_cases() -> Iterator[dict[str, Any]]:
    """Each field of GenerateRequest at the edges of its type and of the server's bounds."""
    floats = (math.nan, math.inf, -math.inf, -0.0, -1.0, 0.0, 1e-45, 1.0000001, 3e38)
    for name in ("temperature", "top_p", "repetition_penalty"):
        yield from ({name: v} for v in floats)
    for name in ("top_k", "max_tokens"):
        yield from ({name: v} for v in (0, 1, 2**31, 2**32 - 1))
    yield from ({"seed": v} for v in (0, 2**31, 2**32, 2**63, 2**64 - 1))
    yield from ({"priority": v} for v in (-(2**31), -1, 1, 2**31 - 1))
    for option in ("coalesce_tokens", "coalesce_ms"):
        yield from ({"stream_options": {option: v}} for v in (1, 4097, 2**32 - 1))
    yield from (
        {"prompt": "", "token_ids": ids} for ids in ([], [0], [260], [261], [2**32 - 1], [5] * 3000)
    )
    yield {"prompt": "", "token_ids": [5, 6], "instructions": "x"}
    texts = ("", " ", "\x00", "\n\r\t", "é" * 300, "😀" * 100, "x" * 70_000, "\u202e" * 10)
    for name in ("model", "prompt", "instructions", "request_id"):
        yield from ({name: t} for t in texts)
    yield from ({"stop": s} for s in ([""], ["s" * 257], ["s"] * 17, ["\x00"], ["😀"]))
    messages: list[list[tuple[str, str]]] = [
        [],
        [("", "x")],
        [("r" * 65, "x")],
        [("user", "")],
        [("user", "x" * 70_000)],
        [("user", "x")] * 4097,
        [("😀", "\x00")],
    ]
    yield from ({"prompt": "", "messages": m} for m in messages)
    yield {"prompt": "", "messages": [("user", "hi")], "token_ids": [5]}


def request(case: dict[str, Any]) -> bytes:
    fields = {**BASE, **case}
    messages = [gen.ChatMessage(role=r, content=c) for r, c in fields.pop("messages", [])]
    options = gen.StreamOptions(**fields.pop("stream_options", {}))
    msg = gen.GenerateRequest(**fields, messages=messages, stream_options=options)
    return msg.SerializeToString()


def _key(number: int, wire_type: int) -> bytes:
    return (
        bytes([(number << 3) | wire_type])
        if number < 16
        else bytes([(number << 3) | wire_type | 0x80, number >> 4])
    )


def malformed(rng: random.Random) -> Iterator[bytes]:
    """Bytes that are no valid GenerateRequest, or barely one: invalid UTF-8 in each string
    field, truncations, bit flips, random noise, absurd lengths, wrong wire types."""
    valid = request({"stop": ["x"], "request_id": "id", "instructions": "i", "seed": 7})
    for number in (*STRING_FIELDS.values(),):
        yield valid + _key(number, 2) + b"\x03\xc3\x28\xff"
    chat = gen.GenerateRequest(model="demo", messages=[gen.ChatMessage(role="u", content="c")])
    yield chat.SerializeToString() + b"\x1a\x04\x0a\x02\xff\xfe"  # role not UTF-8
    yield chat.SerializeToString() + b"\x1a\x04\x12\x02\xc3\x28"  # content not UTF-8
    for cut in range(1, len(valid), 3):
        yield valid[:cut]
    for _ in range(60):
        flipped = bytearray(valid)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        yield bytes(flipped)
    for size in (1, 2, 7, 64, 1024, 65536):
        yield rng.randbytes(size)
    yield b"\x12\xff\xff\xff\xff\x0f"  # prompt said to be 4 GiB long
    yield b"\x0a" + b"\xff" * 11  # a length varint that never ends
    yield _key(14, 2) + b"\x01x"  # max_tokens sent as a string
    yield _key(1, 0) + b"\x01"  # model sent as a number
    yield b"\x00" * 16  # field number 0


async def status_of(channel: Any, method: str, payload: bytes) -> grpc.StatusCode:
    try:
        if method.endswith("Stream"):
            async for _ in channel.unary_stream(method)(payload, timeout=30):
                pass
        else:
            await channel.unary_unary(method)(payload, timeout=30)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def fuzz(port: int, payloads: list[bytes]) -> Counter[grpc.StatusCode]:
    seen: Counter[grpc.StatusCode] = Counter()
    bugs: list[tuple[str, bytes, grpc.StatusCode]] = []
    limit = asyncio.Semaphore(16)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 * 1024 * 1024)]
    ) as channel:

        async def one(method: str, payload: bytes) -> None:
            async with limit:
                code = await status_of(channel, method, payload)
            seen[code] += 1
            if code in SERVER_BUGS:
                bugs.append((method, payload[:80], code))

        await asyncio.gather(*(one(m, p) for p in payloads for m in METHODS))
    assert not bugs, bugs
    return seen


async def test_fuzzed_requests_never_get_unknown_or_internal_and_servers_stay_healthy(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    replica = await start_replica(demo_spec(context_length=256, max_tokens_limit=64))
    router = await start_router(replica)
    rng = random.Random(19)
    payloads = [request(case) for case in field_cases()] + list(malformed(rng))
    for port in (replica.port, router.port):
        seen = await fuzz(port, payloads)
        assert seen[grpc.StatusCode.INVALID_ARGUMENT] > len(payloads)  # most are refused
        assert seen[grpc.StatusCode.OK] > 20  # and the valid ones are served
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert await status_of(channel, METHODS[0], request({})) == grpc.StatusCode.OK
