"""Domain objects of a generation request on the replica, free of protobuf (converted in
``convert.py``); the vocabulary shared with router and client is in ``meshllm.api.types``."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshllm.api.types import FinishReason, Timing, Usage


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Sampling settings of one request, with defaults already applied."""

    temperature: float = 1.0
    """0 means greedy decoding."""
    top_k: int = 0
    """0 means no top-k limit."""
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one engine batch (max_tokens and stop are per
        item)."""
        if self.greedy:
            return ("greedy", self.repetition_penalty, self.seed)
        return (self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed)


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """A request as the client sent it; ``max_tokens`` is None when the client left it unset."""

    request_id: str
    model: str
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    token_ids: tuple[int, ...] = ()
    instructions: str = ""
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    priority: int = 0
    coalesce_tokens: int = 0
    coalesce_ms: int = 0


@dataclass(frozen=True, kw_only=True)
class PreparedRequest:
    """A validated request: token ids and complete sampling settings."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: int = 0
    coalesce_tokens: int = 0
    coalesce_ms: int = 0


@dataclass(frozen=True, kw_only=True)
class Chunk:
    """One streamed piece of a reply; the last one has ``finish_reason`` set."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    stop_sequence: str = ""
    usage: Usage | None = None
    timing: Timing | None = None
    model: str = ""


@dataclass(kw_only=True)
class EngineStats:
    """What an engine knows about its own load, for the load report."""

    queued: int = 0
    running: int = 0
    tokens_in_flight: int = 0
    cache_utilization: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    capacity: int = 0
    """Requests it runs at once (batch slots over all workers); 0: unknown."""
