"""``GenerateChunk`` / ``GenerateResponse`` -> OpenAI reply objects (chat and text completions).

Pure: what the client sees is decided here, the I/O is ``front``'s. Whole replies always carry a
string ``content``/``text`` and a ``usage`` object (clients crash on nulls there); stream chunks
carry ``"usage": null`` only when the client asked for usage, which then comes alone in a last
chunk with ``choices: []``, as OpenAI sends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshllm.api.errors import Cancelled, Unavailable
from meshllm.api.types import ModelInfo
from meshllm.api.v1 import generation_pb2 as gen

FINISH_REASONS: dict[int, str] = {
    gen.FINISH_REASON_STOP: "stop",
    gen.FINISH_REASON_LENGTH: "length",
}
OWNER = "meshllm"


def usage(u: gen.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens or u.prompt_tokens + u.completion_tokens,
    }


def finish_reason(reason: int, request_id: str) -> str:
    """``stop`` or ``length``; a reply that ended any other way is an error, never a success."""
    if (name := FINISH_REASONS.get(reason)) is not None:
        return name
    if reason == gen.FINISH_REASON_CANCELLED:
        raise Cancelled(f"request {request_id} was cancelled before it finished")
    raise Unavailable(
        f"request {request_id} ended with an error on the replica; the reply is incomplete",
        reason="STREAM_INTERRUPTED",
    )


@dataclass(frozen=True)
class Reply:
    """What every object of one reply shares."""

    chat: bool
    id: str
    model: str
    created: int

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, response: gen.GenerateResponse) -> dict[str, Any]:
        """The non-streaming reply."""
        reason = finish_reason(response.finish_reason, self.id)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": response.text}
        else:
            choice["text"] = response.text
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [choice], "usage": usage(response.usage)}

    def chunk(
        self, chunk: gen.GenerateChunk, *, first: bool, include_usage: bool
    ) -> dict[str, Any]:
        """One streamed chunk; the replica's last chunk carries the finish reason."""
        last = chunk.finish_reason != gen.FINISH_REASON_UNSPECIFIED
        reason = finish_reason(chunk.finish_reason, self.id) if last else None
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if chunk.text or first:
                delta["content"] = chunk.text
            choice["delta"] = delta
        else:
            choice["text"] = chunk.text
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        out = {**self._head(kind), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, u: gen.Usage) -> dict[str, Any]:
        """With ``stream_options.include_usage``: the last chunk, usage and no choices."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": usage(u)}


def model(info: ModelInfo) -> dict[str, Any]:
    """A ``/v1/models`` entry: OpenAI's fields, then what meshllm knows of the model."""
    return {
        "id": info.id,
        "object": "model",
        "created": 0,
        "owned_by": OWNER,
        "engine": info.engine,
        "context_length": info.context_length,
        "max_tokens_limit": info.max_tokens_limit,
        "ready_replicas": info.ready_replicas,
    }
