"""Result types of the client (plain dataclasses; protobuf stays inside the client)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from meshllm.api.errors import MeshError


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True, kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Server-side timings in milliseconds, and the replica that served the request."""

    queue_wait_ms: float
    time_to_first_token_ms: float
    decode_ms: float
    total_ms: float
    tokens_per_second: float
    replica: str


@dataclass(frozen=True, kw_only=True)
class StreamChunk:
    """A piece of a streamed reply; ``finish_reason`` is set on the last one only."""

    text: str
    token_ids: tuple[int, ...]
    request_id: str
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    usage: Usage | None = None
    timing: Timing | None = None


@dataclass(frozen=True, kw_only=True)
class Completion:
    """A whole reply."""

    text: str
    token_ids: tuple[int, ...]
    request_id: str
    model: str
    finish_reason: FinishReason
    stop_sequence: str
    usage: Usage
    timing: Timing

    @property
    def replica(self) -> str:
        return self.timing.replica


@dataclass(frozen=True, kw_only=True)
class BatchItem:
    """One result of ``generate_batch``: exactly one of ``result`` and ``error`` is set."""

    index: int
    result: Completion | None
    error: MeshError | None


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    id: str
    engine: str
    context_length: int
    max_tokens_limit: int
    ready_replicas: int


Prompt = str | list[dict[str, str]] | dict[str, Any]
"""A batch input: prompt text, a chat (list of {role, content}), or a dict of request fields."""
