"""Result types of the client (plain dataclasses; protobuf stays inside the client)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

from meshllm.api.errors import MeshError


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Timing:
    """Server-side timings in milliseconds, and the replica that served the request."""

    queue_wait_ms: float
    time_to_first_token_ms: float
    decode_ms: float
    total_ms: float
    tokens_per_second: float
    replica: str


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamChunk:
    """A piece of a streamed reply; ``finish_reason`` is set on the last one only."""

    text: str
    token_ids: tuple[int, ...]
    request_id: str
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    usage: Usage | None = None
    timing: Timing | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
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
    cached: bool = False
    """True when it came from the client's response cache, not from the server."""

    @property
    def replica(self) -> str:
        return self.timing.replica

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (the response cache and the CLI's output rows use it)."""
        out = asdict(self)
        out["finish_reason"] = self.finish_reason.value
        out["token_ids"] = list(self.token_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        """The inverse of :meth:`to_dict`."""
        return cls(
            text=data["text"], token_ids=tuple(data["token_ids"]), request_id=data["request_id"],
            model=data["model"], finish_reason=FinishReason(data["finish_reason"]),
            stop_sequence=data["stop_sequence"], usage=Usage(**data["usage"]),
            timing=Timing(**data["timing"]), cached=bool(data.get("cached", False)),
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchItem:
    """One result of a batch: exactly one of ``result`` and ``error`` is set.

    ``index`` is the item's position in the input; ``attempts`` counts the calls made for it
    (1 when the first succeeded or failed for good; 0 when it was never sent: aborted, cached,
    or rejected by the client before sending).
    """

    index: int
    result: Completion | None
    error: MeshError | None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelInfo:
    id: str
    engine: str
    context_length: int
    max_tokens_limit: int
    ready_replicas: int


Prompt = str | list[dict[str, str]] | dict[str, Any]
"""A batch input: prompt text, a chat (list of {role, content}), or a dict of request fields."""
