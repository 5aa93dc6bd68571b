"""CUDA paths, run on a machine with a GPU (marked ``gpu``; skipped with the reason elsewhere)."""

from __future__ import annotations

import asyncio

import ctranslate2
import grpc
import pytest
from conftest import StartReplica, collect, demo_spec, stub

from meshllm.api.v1 import generation_pb2 as gen

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        ctranslate2.get_cuda_device_count() == 0, reason="no CUDA device visible to CTranslate2"
    ),
]


@pytest.mark.parametrize("compute_type", ["float32", "float16", "int8_float16"])
async def test_ctranslate2_on_cuda_streams_concurrently(
    start_replica: StartReplica, compute_type: str
) -> None:
    server = await start_replica(demo_spec(compute_type=compute_type), device="cuda:0")
    channel, client = stub(server.port)
    async with channel:
        requests = [
            gen.GenerateRequest(model="demo", prompt=f"gpu {i}", max_tokens=64, temperature=0.0)
            for i in range(16)
        ]
        results = await asyncio.gather(*[collect(client.GenerateStream(r)) for r in requests])
        alone = await collect(client.GenerateStream(requests[3]))
        call = client.GenerateStream(
            gen.GenerateRequest(model="demo", prompt="cancel", max_tokens=2000)
        )
        async for _ in call:
            break
        call.cancel()
        with pytest.raises(grpc.aio.AioRpcError):
            await collect(client.GenerateStream(requests[0], timeout=0.001))
    assert all(sum(len(c.token_ids) for c in r) == 64 for r in results)
    assert [t for c in results[3] for t in c.token_ids] == [t for c in alone for t in c.token_ids]
    assert server.replica is not None
    status = server.replica.status()
    assert status.memory.source in ("nvml", "process")
