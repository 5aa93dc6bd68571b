"""Request building and response conversion for the client (the one place that sees
generation protobuf). Usage, timing, finish reason and model info convert through
``meshllm.api.convert``, as on the servers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from meshllm.api import convert
from meshllm.api.types import FinishReason, ModelInfo
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.client._options import NAMES, RequestFields
from meshllm.client._types import Completion, StreamChunk

_SCALARS = tuple(sorted(NAMES - {"stop", "token_ids"}))
"""RequestFields set on the request as they are (None: left unset)."""


def build_request(
    prompt: str | Sequence[Mapping[str, str]] | None,
    *,
    model: str,
    fields: RequestFields,
    coalesce_tokens: int = 0,
    coalesce_ms: int = 0,
) -> gen.GenerateRequest:
    """A GenerateRequest from a prompt string or a chat (list of {role, content})."""
    req = gen.GenerateRequest(
        model=model, stop=list(fields.stop), token_ids=list(fields.token_ids or ())
    )
    if isinstance(prompt, str):
        req.prompt = prompt
    elif prompt is not None:
        req.messages.extend(gen.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    for name in _SCALARS:
        if (value := getattr(fields, name)) is not None:
            setattr(req, name, value)
    if coalesce_tokens or coalesce_ms:
        req.stream_options.coalesce_tokens = coalesce_tokens
        req.stream_options.coalesce_ms = coalesce_ms
    return req


def chunk_from_pb(c: gen.GenerateChunk) -> StreamChunk:
    final = convert.finish_from_pb(c.finish_reason)
    return StreamChunk(
        text=c.text,
        token_ids=tuple(c.token_ids),
        request_id=c.request_id,
        finish_reason=final,
        stop_sequence=c.stop_sequence,
        usage=convert.usage_from_pb(c.usage) if final is not None else None,
        timing=convert.timing_from_pb(c.timing) if final is not None else None,
    )


def completion_from_pb(r: gen.GenerateResponse) -> Completion:
    return Completion(
        text=r.text,
        token_ids=tuple(r.token_ids),
        request_id=r.request_id,
        model=r.model,
        finish_reason=convert.finish_from_pb(r.finish_reason) or FinishReason.ERROR,
        stop_sequence=r.stop_sequence,
        usage=convert.usage_from_pb(r.usage),
        timing=convert.timing_from_pb(r.timing),
    )


def models_from_pb(resp: gen.ListModelsResponse) -> list[ModelInfo]:
    return [convert.model_info_from_pb(m) for m in resp.models]


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
