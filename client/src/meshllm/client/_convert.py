"""Request building and response conversion for the client (the one place that sees protobuf)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.client._types import Completion, FinishReason, ModelInfo, StreamChunk, Timing, Usage

_FINISH = {
    gen.FINISH_REASON_STOP: FinishReason.STOP,
    gen.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    gen.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
    gen.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_SCALARS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_tokens", "seed",
            "instructions", "request_id", "priority")  # fmt: skip


def build_request(
    prompt: str | Sequence[Mapping[str, str]] | None,
    *,
    model: str,
    token_ids: Sequence[int] | None = None,
    stop: Sequence[str] = (),
    coalesce_tokens: int = 0,
    coalesce_ms: int = 0,
    **fields: Any,
) -> gen.GenerateRequest:
    """A GenerateRequest from a prompt string or a chat (list of {role, content})."""
    unknown = set(fields) - set(_SCALARS)
    if unknown:
        raise TypeError(f"unknown request fields: {', '.join(sorted(unknown))}")
    req = gen.GenerateRequest(model=model, stop=list(stop), token_ids=list(token_ids or ()))
    if isinstance(prompt, str):
        req.prompt = prompt
    elif prompt is not None:
        req.messages.extend(gen.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    for name, value in fields.items():
        if value is not None:
            setattr(req, name, value)
    if coalesce_tokens or coalesce_ms:
        req.stream_options.coalesce_tokens = coalesce_tokens
        req.stream_options.coalesce_ms = coalesce_ms
    return req


def _usage(u: gen.Usage) -> Usage:
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                 total_tokens=u.total_tokens)  # fmt: skip


def _timing(t: gen.Timing) -> Timing:
    return Timing(queue_wait_ms=t.queue_wait_ms, time_to_first_token_ms=t.time_to_first_token_ms,
                  decode_ms=t.decode_ms, total_ms=t.total_ms, tokens_per_second=t.tokens_per_second,
                  replica=t.replica)  # fmt: skip


def chunk_from_pb(c: gen.GenerateChunk) -> StreamChunk:
    final = c.finish_reason != gen.FINISH_REASON_UNSPECIFIED
    return StreamChunk(
        text=c.text, token_ids=tuple(c.token_ids), request_id=c.request_id,
        finish_reason=_FINISH.get(c.finish_reason) if final else None,
        stop_sequence=c.stop_sequence,
        usage=_usage(c.usage) if final else None,
        timing=_timing(c.timing) if final else None,
    )  # fmt: skip


def completion_from_pb(r: gen.GenerateResponse) -> Completion:
    return Completion(
        text=r.text, token_ids=tuple(r.token_ids), request_id=r.request_id, model=r.model,
        finish_reason=_FINISH.get(r.finish_reason, FinishReason.ERROR),
        stop_sequence=r.stop_sequence, usage=_usage(r.usage), timing=_timing(r.timing),
    )  # fmt: skip


def model_from_pb(m: gen.ModelInfo) -> ModelInfo:
    return ModelInfo(id=m.id, engine=m.engine, context_length=m.context_length,
                     max_tokens_limit=m.max_tokens_limit, ready_replicas=m.ready_replicas)  # fmt: skip


_NOT_OUTPUT = ("request_id", "priority", "stream_options")


def deterministic(req: gen.GenerateRequest) -> bool:
    """Greedy decoding, set explicitly (an unset temperature samples at 1 on the replica)."""
    return (req.HasField("temperature") and req.temperature == 0.0) or (
        req.HasField("top_k") and req.top_k == 1
    )


def canonical_request(req: gen.GenerateRequest) -> dict[str, Any]:
    """The fields that decide the output, as plain JSON values (the response cache's key)."""
    data: dict[str, Any] = json_format.MessageToDict(req, preserving_proto_field_name=True)
    for name in _NOT_OUTPUT:
        data.pop(name, None)
    return data
