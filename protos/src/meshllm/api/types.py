"""The domain vocabulary every meshllm part shares, free of protobuf.

Replica, router and client import these; ``meshllm.api.convert`` is the one place they meet the
wire. A type defined here is never copied into a component.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from meshllm.api.spec import ModelSpec


class FinishReason(enum.Enum):
    """Why a reply ended."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, kw_only=True, slots=True)
class Timing:
    """Milliseconds, measured on the replica that served the request."""

    queue_wait_ms: float
    time_to_first_token_ms: float
    decode_ms: float
    total_ms: float
    tokens_per_second: float
    replica: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelInfo:
    """A model that can serve requests now (``Generation.ListModels``)."""

    id: str
    engine: str
    context_length: int
    """Longest prompt plus completion, in tokens."""
    max_tokens_limit: int
    ready_replicas: int = 1
    """Replicas serving it (1 when asking a replica directly)."""


class ReplicaState(enum.Enum):
    """A replica's lifecycle; ``UNKNOWN`` until it has reported (router side only)."""

    UNKNOWN = "unknown"
    EMPTY = "empty"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    UNLOADING = "unloading"
    FAILED = "failed"


HOSTING = frozenset({ReplicaState.LOADING, ReplicaState.READY, ReplicaState.DRAINING})
"""States in which a replica holds (or is about to hold) its model."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadReport:
    """How busy a replica is (``ReplicaControl.WatchLoad``)."""

    replica_id: str
    state: ReplicaState
    model: str
    """The loaded model's id ("" when none)."""
    queued: int = 0
    """Admitted requests waiting for an engine slot."""
    running: int = 0
    tokens_in_flight: int = 0
    """Tokens running and queued requests may still generate, at most."""
    tokens_per_second: float = 0.0
    cache_utilization: float = 0.0
    requests_total: int = 0
    tokens_total: int = 0
    timestamp_ms: int = 0
    device: str = ""
    """``cpu`` or ``cuda:N``."""
    capacity: int = 0
    """Requests the engine runs at once (batch slots over all workers); 0: not said."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceMemory:
    device: str
    used_bytes: int
    total_bytes: int
    source: str
    """``nvml`` for a GPU, ``process`` for the resident set of a CPU replica."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplicaStatus:
    """One replica as it describes itself (or, when it cannot be asked, as a router last saw it)."""

    replica_id: str
    state: ReplicaState
    spec: ModelSpec | None = None
    """The spec of the loaded (or loading, or failed) model."""
    device: str = ""
    error: str = ""
    """Why the last load failed, or why the router cannot reach it."""
    load: LoadReport | None = None
    memory: DeviceMemory | None = None
    version: str = ""

    @property
    def model(self) -> str:
        return self.spec.id if self.spec is not None else ""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelPlacement:
    """One model across the mesh (``Admin``): its catalog settings and the replicas holding it."""

    model: str
    configured: bool
    """In the router's catalog (False: loaded on a replica but unknown to the catalog)."""
    desired_replicas: int
    max_replicas: int
    """0: no limit."""
    ready_replicas: int
    pending: str
    """Why it has fewer replicas than desired ("" when it has enough)."""
    replicas: tuple[ReplicaStatus, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class QuotaUsage:
    """One limit of one tenant right now (``Admin.GetQuotaUsage``)."""

    tenant: str
    limit: str
    used: int
    limit_value: int
    resets_in_s: float


BYTES_PER_TOKEN = 4
"""The router has no tokenizer: prompts are estimated from their UTF-8 size (BPE vocabularies
average about four bytes a token on English text). Quotas settle with the replica's real count,
so the estimate only decides what is held meanwhile, and how a client paces itself."""
TOKENS_PER_MESSAGE = 4
"""Chat-template tokens around each message, in the estimate."""


def prompt_tokens_estimate(
    *,
    prompt: str = "",
    messages: Iterable[tuple[str, str]] = (),
    instructions: str = "",
    token_ids: int = 0,
) -> int:
    """Prompt tokens of a request before it is tokenized: ``token_ids`` (a count) when it sends
    ids, else from the bytes of prompt, instructions and each message's role and content."""
    if token_ids:
        return token_ids
    size, count = len(prompt.encode()) + len(instructions.encode()), 0
    for role, content in messages:
        size += len(role.encode()) + len(content.encode())
        count += 1
    return math.ceil(size / BYTES_PER_TOKEN) + TOKENS_PER_MESSAGE * count
