"""Wire <-> domain conversion of the replica's own request types: protobuf types stop here.

The shared vocabulary (spec, state, load report, status, usage, timing, finish reason, model
info) converts in ``meshllm.api.convert``.
"""

from __future__ import annotations

import uuid

from meshllm.api.convert import finish_to_pb, timing_to_pb, usage_to_pb
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.replica.types import ChatMessage, Chunk, GenerationRequest


def request_from_pb(msg: gen.GenerateRequest) -> GenerationRequest:
    def opt(name: str) -> object:
        return getattr(msg, name) if msg.HasField(name) else None

    return GenerationRequest(
        request_id=msg.request_id or uuid.uuid4().hex,
        model=msg.model,
        prompt=msg.prompt,
        messages=tuple(ChatMessage(m.role, m.content) for m in msg.messages),
        token_ids=tuple(msg.token_ids),
        instructions=msg.instructions,
        temperature=opt("temperature"),  # type: ignore[arg-type]
        top_k=opt("top_k"),  # type: ignore[arg-type]
        top_p=opt("top_p"),  # type: ignore[arg-type]
        repetition_penalty=opt("repetition_penalty"),  # type: ignore[arg-type]
        max_tokens=opt("max_tokens"),  # type: ignore[arg-type]
        stop=tuple(msg.stop),
        seed=opt("seed"),  # type: ignore[arg-type]
        priority=msg.priority,
        coalesce_tokens=msg.stream_options.coalesce_tokens,
        coalesce_ms=msg.stream_options.coalesce_ms,
    )


def chunk_to_pb(chunk: Chunk, request_id: str) -> gen.GenerateChunk:
    out = gen.GenerateChunk(
        text=chunk.text, token_ids=chunk.token_ids, request_id=request_id, model=chunk.model
    )
    if chunk.finish_reason is not None:
        out.finish_reason = finish_to_pb(chunk.finish_reason)
        out.stop_sequence = chunk.stop_sequence
    if chunk.usage is not None:
        out.usage.CopyFrom(usage_to_pb(chunk.usage))
    if chunk.timing is not None:
        out.timing.CopyFrom(timing_to_pb(chunk.timing))
    return out
