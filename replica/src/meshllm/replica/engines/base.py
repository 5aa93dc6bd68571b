"""The engine protocol: what the replica needs from CTranslate2, ExLlamaV3 or a test double."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from meshllm.replica.engines.stream import TokenStream
from meshllm.replica.types import EngineStats, SamplingParams

__all__ = ["Engine", "EngineSettings", "TokenStream"]


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """Everything an engine factory needs; numeric 0 means the engine's own default."""

    model_dir: Path
    """Model folder (weights plus tokenizer files)."""
    device: str = "cpu"
    """``cpu`` or ``cuda:N``."""
    compute_type: str = ""
    max_batch_size: int = 0
    inter_threads: int = 0
    intra_threads: int = 0
    context_length: int = 0
    batch_window_ms: float = 2.0
    """How long a free worker waits for more requests to join a batch it is about to start."""
    eos_ids: frozenset[int] = frozenset()
    vocabulary: tuple[str, ...] = ()
    """Token strings by id, for engines that take strings (CTranslate2)."""
    options: dict[str, str] = field(default_factory=dict)


class Engine(Protocol):
    """A loaded model that turns prompt token ids into streams of generated token ids."""

    name: str

    async def start(self) -> None:
        """Begin accepting work (called on the event loop after construction)."""

    def submit(
        self, prompt_ids: tuple[int, ...], sampling: SamplingParams, priority: int
    ) -> TokenStream:
        """Queue one request; its tokens arrive on the returned stream."""

    def stats(self) -> EngineStats:
        """Queue and running counts for the load report."""

    async def close(self) -> None:
        """Cancel what is left and free the model's memory."""
