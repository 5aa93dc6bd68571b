"""The same calls on grpc.aio stubs (asyncio). Errors decode exactly as in the sync example.

docs/stubs.md shows the regions between ``[START name]`` and ``[END name]``; the doc's copies are
checked against them, and tests/integration/test_stubs.py runs them against a real router.
"""

from __future__ import annotations

# [START aio]
from collections.abc import Callable

import grpc
from meshllm_stubs_example import CallFailed, Reply, auth, decode_failure, finished, rate_limits

from meshllm.api.v1 import generation_pb2 as pb
from meshllm.api.v1 import generation_pb2_grpc as pb_grpc


def connect(target: str) -> tuple[grpc.aio.Channel, pb_grpc.GenerationStub]:
    """Create the channel inside the running event loop and close it there (``async with``)."""
    channel = grpc.aio.insecure_channel(target)
    return channel, pb_grpc.GenerationStub(channel)


async def stream(
    stub: pb_grpc.GenerationStub,
    request: pb.GenerateRequest,
    *,
    api_key: str,
    timeout_s: float,
    on_text: Callable[[str], object],
) -> Reply:
    call = stub.GenerateStream(request, metadata=auth(api_key), timeout=timeout_s)
    parts: list[str] = []
    last: pb.GenerateChunk | None = None
    try:
        limits = rate_limits(await call.initial_metadata())
        async for chunk in call:
            parts.append(chunk.text)
            on_text(chunk.text)
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                last = chunk
    except grpc.aio.AioRpcError as e:  # the same google.rpc details as in the sync stubs
        raise CallFailed(decode_failure(e), "".join(parts)) from None
    return finished(parts, last, limits)


async def first_chunks(
    stub: pb_grpc.GenerationStub,
    request: pb.GenerateRequest,
    *,
    api_key: str,
    timeout_s: float,
    chunks: int,
) -> str:
    call = stub.GenerateStream(request, metadata=auth(api_key), timeout=timeout_s)
    parts: list[str] = []
    try:
        async for chunk in call:
            parts.append(chunk.text)
            if len(parts) == chunks:
                break
    except grpc.aio.AioRpcError as e:
        raise CallFailed(decode_failure(e), "".join(parts)) from None
    finally:
        call.cancel()  # as with sync stubs (cancelling an awaiting task cancels its call too)
    return "".join(parts)


# [END aio]
