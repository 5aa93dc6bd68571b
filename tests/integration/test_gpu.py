"""CUDA paths, run on a machine with a GPU (marked ``gpu``; skipped with the reason elsewhere).

CTranslate2 runs the demo model on ``cuda:0`` in three compute types; ExLlamaV3 runs the tiny
FP16 Llama folder (``models/tiny_llama.py``, built offline). Both: concurrent streams, greedy
determinism, cancellation, deadlines; ExLlamaV3 also its cache report, a quantized cache, stop
strings, seeded sampling and unloading. ``pip install 'meshllm-replica[exllamav3]'`` (torch and
exllamav3, whose extension compiles on first import and needs nvcc) enables the ExLlamaV3 half.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ctranslate2
import grpc
import pytest
from conftest import StartReplica, collect, demo_spec, stub

from meshllm.api.spec import ModelSpec
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.replica.engines import Engine
from meshllm.replica.server import ReplicaServer
from meshllm.replica.types import EngineStats

pytestmark = pytest.mark.gpu


def _exllamav3_unavailable() -> str:
    """Why the ExLlamaV3 tests cannot run here ('' when they can)."""
    if importlib.util.find_spec("exllamav3") is None:
        return "exllamav3 not installed (pip install 'meshllm-replica[exllamav3]')"
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return "no CUDA device visible to torch"
    return ""


needs_ct2_cuda = pytest.mark.skipif(
    ctranslate2.get_cuda_device_count() == 0, reason="no CUDA device visible to CTranslate2"
)
_EXL3_MISSING = _exllamav3_unavailable()
needs_exllamav3 = pytest.mark.skipif(bool(_EXL3_MISSING), reason=_EXL3_MISSING or "ready")


def ids(chunks: Sequence[gen.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text(chunks: Sequence[gen.GenerateChunk]) -> str:
    return "".join(c.text for c in chunks)


async def settled(engine: Engine, timeout_s: float = 2.0) -> EngineStats:
    """The engine's stats once nothing is queued or running (or at the timeout)."""
    for _ in range(int(timeout_s / 0.01)):
        stats = engine.stats()
        if stats.queued + stats.running == 0 and stats.cache_utilization == 0.0:
            break
        await asyncio.sleep(0.01)
    return engine.stats()


# -- CTranslate2 --------------------------------------------------------------------------------


@needs_ct2_cuda
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
    assert ids(results[3]) == ids(alone)
    assert server.replica is not None
    status = server.replica.status()
    assert status.memory is not None
    expected = "nvml" if importlib.util.find_spec("pynvml") else "process"
    assert status.memory.source == expected and status.memory.total_bytes > 0


# -- ExLlamaV3 ----------------------------------------------------------------------------------


async def start_llama(start: StartReplica, tiny_llama_dir: Path, **options: str) -> ReplicaServer:
    spec = ModelSpec(id="llama", path=str(tiny_llama_dir), engine="exllamav3", options=options)
    server = await start(spec, device="cuda:0")
    assert server.replica is not None
    return server


def request(prompt: str, max_tokens: int, **kw: object) -> gen.GenerateRequest:
    fields: dict[str, object] = {"temperature": 0.0, **kw}
    return gen.GenerateRequest(model="llama", prompt=prompt, max_tokens=max_tokens, **fields)  # type: ignore[arg-type]


@needs_exllamav3
async def test_exllamav3_streams_concurrently_and_reports_cache_use(
    start_replica: StartReplica, tiny_llama_dir: Path
) -> None:
    server = await start_llama(start_replica, tiny_llama_dir, cache_size="8192")
    assert server.replica is not None
    channel, client = stub(server.port)
    async with channel:
        requests = [request(f"gpu request {i}: ", 64) for i in range(16)]
        work = asyncio.gather(*[collect(client.GenerateStream(r)) for r in requests])
        busiest = 0.0
        while not work.done():
            busiest = max(busiest, server.replica.load_report().cache_utilization)
            await asyncio.sleep(0.001)
        results = await work
        alone = [await collect(client.GenerateStream(requests[3])) for _ in range(2)]
        assert server.replica.model is not None
        after = await settled(server.replica.model.engine)
    for chunks in results:
        final = chunks[-1]
        # the tiny Llama's output head keeps end-of-sequence far down: every reply is full length
        assert len(ids(chunks)) == 64, text(chunks)
        assert final.finish_reason == gen.FINISH_REASON_LENGTH
        assert final.usage.completion_tokens == 64 and final.usage.prompt_tokens > 0
    assert ids(alone[0]) == ids(alone[1])  # greedy is deterministic for the same batch shape
    assert text(alone[0])
    assert 0.0 < busiest <= 1.0
    assert (after.running, after.queued, after.cache_utilization) == (0, 0, 0.0)
    status = server.replica.status()
    assert status.memory is not None
    expected = "nvml" if importlib.util.find_spec("pynvml") else "process"
    assert status.memory.source == expected


@needs_exllamav3
async def test_exllamav3_cancel_and_deadline_free_the_job(
    start_replica: StartReplica, tiny_llama_dir: Path
) -> None:
    server = await start_llama(start_replica, tiny_llama_dir)
    assert server.replica is not None and server.replica.model is not None
    engine = server.replica.model.engine
    channel, client = stub(server.port)
    async with channel:
        call = client.GenerateStream(request("cancel me", 2000))
        async for _ in call:
            break
        call.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await collect(client.GenerateStream(request("too late", 2000), timeout=0.05))
        stats = await settled(engine)
        still = await collect(client.GenerateStream(request("still serving", 8)))
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stats.running + stats.queued == 0 and stats.cache_utilization == 0.0
    assert len(ids(still)) == 8


@needs_exllamav3
async def test_exllamav3_quantized_cache_generates(
    start_replica: StartReplica, tiny_llama_dir: Path
) -> None:
    server = await start_llama(start_replica, tiny_llama_dir, cache_quant="4,6", cache_size="4096")
    channel, client = stub(server.port)
    async with channel:
        results = await asyncio.gather(
            *[collect(client.GenerateStream(request(f"q{i}", 32))) for i in range(4)]
        )
    assert all(len(ids(r)) == 32 for r in results)


@needs_exllamav3
async def test_exllamav3_stop_strings_and_seeded_sampling(
    start_replica: StartReplica, tiny_llama_dir: Path
) -> None:
    server = await start_llama(start_replica, tiny_llama_dir)
    channel, client = stub(server.port)
    async with channel:
        full = text(await collect(client.GenerateStream(request("stop test", 48))))
        # three ASCII letters from the reply: both sides decode them the same way
        stop = next(
            full[i : i + 3]
            for i in range(10, len(full) - 3)
            if all(c.isascii() and c.isalpha() for c in full[i : i + 3])
        )
        cut = await collect(client.GenerateStream(request("stop test", 48, stop=[stop])))
        sampled = [
            await collect(client.GenerateStream(request("seeded", 32, temperature=0.9, seed=7)))
            for _ in range(2)
        ]
    assert text(cut) == full[: full.index(stop)]
    assert cut[-1].finish_reason == gen.FINISH_REASON_STOP and cut[-1].stop_sequence == stop
    assert ids(sampled[0]) == ids(sampled[1])  # each job has its own seeded generator


@needs_exllamav3
async def test_exllamav3_unload_frees_gpu_memory(
    start_replica: StartReplica, tiny_llama_dir: Path
) -> None:
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(0)
    server = await start_llama(start_replica, tiny_llama_dir, cache_size="65536")
    assert server.replica is not None
    loaded = torch.cuda.memory_allocated(0)
    await server.replica.unload(drain_timeout_s=1.0)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated(0)
    assert loaded - before > 100 * 2**20  # a 64k-token FP16 cache is 128 MiB, plus the weights
    assert after - before < 0.1 * (loaded - before), (before, loaded, after)
    assert server.replica.state.value == "empty"
