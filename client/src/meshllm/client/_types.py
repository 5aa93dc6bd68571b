"""Result types of the client (plain dataclasses; protobuf stays inside the client).

Finish reason, usage and timing are the shared vocabulary of ``meshllm.api.types``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from meshllm.api.errors import MeshError, Unavailable
from meshllm.api.types import FinishReason, Timing, Usage


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

    @property
    def whole(self) -> bool:
        """The reply ended as replies do (a stop, or its length), not cut short by a server
        (``cancelled``, ``error``): only a whole reply counts as a success."""
        return self.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready fields (the response cache and the CLI's output rows use it)."""
        out = asdict(self)
        out["finish_reason"] = self.finish_reason.value
        out["token_ids"] = list(self.token_ids)
        out["usage"]["total_tokens"] = self.usage.total_tokens  # a property: asdict skips it
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Completion:
        """The inverse of :meth:`to_dict`."""
        usage = data["usage"]  # its total_tokens is derived again, not read
        return cls(
            text=data["text"],
            token_ids=tuple(data["token_ids"]),
            request_id=data["request_id"],
            model=data["model"],
            finish_reason=FinishReason(data["finish_reason"]),
            stop_sequence=data["stop_sequence"],
            usage=Usage(
                prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"]
            ),
            timing=Timing(**data["timing"]),
            cached=bool(data.get("cached", False)),
        )


def cut_short(completion: Completion) -> Unavailable:
    """The error a reply that is not :attr:`~Completion.whole` stands for: transient, so a batch
    retries it (the caller saw none of it)."""
    return Unavailable(
        f"the reply ended with finish reason {completion.finish_reason.value!r} after "
        f"{completion.usage.completion_tokens} tokens: the server cut it short",
        reason="STREAM_INTERRUPTED",
        metadata={
            "replica": completion.replica,
            "tokens_streamed": str(completion.usage.completion_tokens),
        },
    )


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


Prompt = str | list[dict[str, str]] | dict[str, Any]
"""A batch input: prompt text, a chat (list of {role, content}), or a dict of request fields."""
