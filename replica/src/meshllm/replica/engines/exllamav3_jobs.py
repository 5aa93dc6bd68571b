"""ExLlamaV3 without ExLlamaV3: settings, request -> job parameters, result dict -> event.

Everything here is pure (no torch, no exllamav3 import), so CPU CI tests it exactly; the engine
(``exllamav3.py``) only turns a :class:`JobSpec` into the library's ``Job`` and feeds the result
dicts of ``Generator.iterate()`` through :func:`read_result`.

The result dicts, as ExLlamaV3 documents them: ``stage`` is ``started``, ``prefill`` or
``streaming``; streaming results carry ``token_ids`` (a (1, n) tensor) and ``text``; the last one
has ``eos=True`` and an ``eos_reason`` (``stop_token``, ``stop_string``, ``max_new_tokens``,
``end_filter``, ...), ``new_tokens`` and ``prompt_tokens``, and under ``held`` what was generated
but not yet emitted. A stop token is never emitted in ``token_ids``: it is the last id under
``held``, after any tokens held back for a possible stop string or an incomplete character.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshllm.api.errors import FailedPrecondition, FieldViolation, invalid_fields
from meshllm.api.types import FinishReason
from meshllm.replica.engines.base import EngineSettings
from meshllm.replica.types import SamplingParams

PAGE_SIZE = 256
"""Tokens per page of ExLlamaV3's paged cache; its size must be a multiple of this."""
MIN_CACHE_TOKENS = 8192
DEFAULT_MAX_CHUNK = 2048
DEFAULT_MAX_JOBS = 32
CACHE_BITS = range(2, 9)
OPTIONS = ("cache_size", "cache_quant", "max_chunk_size")
_CUDA = re.compile(r"^cuda(:\d+)?$")


@dataclass(frozen=True, kw_only=True)
class ExLlamaV3Options:
    """The engine's settings, from ``EngineSettings`` and ``ModelSpec.options``."""

    device_index: int
    cache_tokens: int
    """Tokens in the paged KV cache, shared by all running jobs (option ``cache_size``)."""
    cache_bits: tuple[int, int] | None
    """(key bits, value bits) of a quantized cache; None keeps it in FP16 (``cache_quant``)."""
    max_chunk_size: int
    """Prompt tokens prefilled per step (``max_chunk_size``); smaller steps keep other jobs'
    tokens flowing while a long prompt is ingested."""
    max_jobs: int
    """Jobs handed to the generator at once (``--max-batch-size``); more wait in meshllm's
    priority queue, so an urgent request overtakes them (ExLlamaV3's own queue is FIFO)."""


def parse_options(settings: EngineSettings) -> ExLlamaV3Options:
    """Check device and options once, before anything is imported or loaded.

    Raises FailedPrecondition when the device is not CUDA (ExLlamaV3 has no CPU path) and
    InvalidArgument naming each bad option.
    """
    if not _CUDA.match(settings.device):
        raise FailedPrecondition(
            f"engine 'exllamav3' needs a CUDA device (--device cuda:N); got {settings.device!r}",
            reason="DEVICE_UNSUPPORTED",
        )
    bad: list[FieldViolation] = []
    opts = settings.options
    for key in sorted(set(opts) - set(OPTIONS)):
        bad.append(
            FieldViolation(f"options.{key}", f"unknown; exllamav3 knows {', '.join(OPTIONS)}")
        )
    if settings.compute_type not in ("", "default"):
        bad.append(
            FieldViolation(
                "compute_type",
                "not used by exllamav3: the model folder's "
                "quantization decides (use options.cache_quant for the cache)",
            )
        )
    context = round_up_pages(settings.context_length or 1)
    cache = _int_option(opts, "cache_size", max(MIN_CACHE_TOKENS, context), bad)
    if cache is not None and (cache <= 0 or cache % PAGE_SIZE):
        bad.append(
            FieldViolation(
                "options.cache_size", f"{cache} is not a positive multiple of {PAGE_SIZE}"
            )
        )
    elif cache is not None and cache < context:
        bad.append(
            FieldViolation(
                "options.cache_size",
                f"{cache} tokens cannot hold one request of the "
                f"full context ({settings.context_length}); raise it or lower the context length",
            )
        )
    chunk = _int_option(opts, "max_chunk_size", DEFAULT_MAX_CHUNK, bad)
    if chunk is not None and chunk <= 0:
        bad.append(FieldViolation("options.max_chunk_size", f"{chunk} is not positive"))
    bits = parse_cache_quant(opts.get("cache_quant", ""), bad)
    if bad:
        raise invalid_fields("invalid exllamav3 settings", bad)
    assert cache is not None and chunk is not None  # None only together with a violation
    return ExLlamaV3Options(
        device_index=int(settings.device.partition(":")[2] or 0),
        cache_tokens=cache,
        cache_bits=bits,
        max_chunk_size=chunk,
        max_jobs=settings.max_batch_size or DEFAULT_MAX_JOBS,
    )


def parse_cache_quant(value: str, bad: list[FieldViolation]) -> tuple[int, int] | None:
    """``""`` -> None (FP16); ``"4"`` -> (4, 4); ``"4,6"`` -> (4, 6): key and value bits, 2 to 8."""
    if not value.strip():
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) in CACHE_BITS for p in parts):
        k = int(parts[0])
        return k, int(parts[-1])
    bad.append(
        FieldViolation(
            "options.cache_quant",
            f"{value!r} is not 'BITS' or 'KEY_BITS,VALUE_BITS' with bits from 2 to 8",
        )
    )
    return None


def round_up_pages(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE) * PAGE_SIZE


def _int_option(
    opts: Mapping[str, str], key: str, default: int, bad: list[FieldViolation]
) -> int | None:
    raw = opts.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        bad.append(FieldViolation(f"options.{key}", f"{raw!r} is not an integer"))
        return None


# -- request -> job ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SamplerSpec:
    """Arguments of ExLlamaV3's ``ComboSampler``; neutral values are no-op steps in it."""

    temperature: float
    """0 means greedy (ComboSampler then takes the argmax after the repetition penalty)."""
    top_k: int
    top_p: float
    repetition_penalty: float


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """Everything the library's ``Job`` is built from."""

    identifier: int
    """Returned with every result dict of the job: how results find their request."""
    input_ids: tuple[int, ...]
    max_new_tokens: int
    stop_conditions: tuple[str | int, ...]
    """Stop strings, then stop token ids: ExLlamaV3 ends the job on its own thread at once."""
    seed: int | None
    sampler: SamplerSpec


def job_spec(
    identifier: int,
    prompt_ids: tuple[int, ...],
    sampling: SamplingParams,
    stop_token_ids: Iterable[int],
) -> JobSpec:
    """One request as ExLlamaV3 job parameters.

    The replica's own detokenizer and stop matcher still produce the reply text (the same code
    for every engine); ExLlamaV3 gets the stop strings and end-of-sequence ids too, so the job
    ends where the text does instead of one round trip later.
    """
    stops: tuple[str | int, ...] = (
        *dict.fromkeys(s for s in sampling.stop if s),
        *sorted(set(stop_token_ids)),
    )
    return JobSpec(
        identifier=identifier,
        input_ids=tuple(prompt_ids),
        max_new_tokens=sampling.max_tokens,
        stop_conditions=stops,
        seed=sampling.seed,
        sampler=SamplerSpec(
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_k=0 if sampling.greedy else sampling.top_k,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
        ),
    )


# -- result dict -> event ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobEvent:
    """One result dict of ``Generator.iterate()``, as plain values."""

    identifier: object
    stage: str
    token_ids: tuple[int, ...] = ()
    """Ids generated since the last event, held ones included when the job ends."""
    text: str = ""
    finish_reason: FinishReason | None = None
    """Set on the job's last event."""
    eos_reason: str = ""
    stop_string: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def read_result(result: Mapping[str, Any]) -> JobEvent:
    """Map one result dict; works on tensors (``tolist``) and on plain lists alike."""
    ids = token_list(result.get("token_ids"))
    if not result.get("eos"):
        return JobEvent(
            identifier=result.get("identifier"),
            stage=str(result.get("stage", "")),
            token_ids=ids,
            text=str(result.get("text", "")),
        )
    held = result.get("held") or {}
    eos_reason = str(result.get("eos_reason", ""))
    return JobEvent(
        identifier=result.get("identifier"),
        stage=str(result.get("stage", "")),
        token_ids=ids + token_list(held.get("token_ids")),
        text=str(result.get("text", "")),
        finish_reason=finish_reason(eos_reason),
        eos_reason=eos_reason,
        stop_string=str(result.get("eos_triggering_string", "")),
        prompt_tokens=int(result.get("prompt_tokens", 0)),
        completion_tokens=int(result.get("new_tokens", 0)),
    )


def finish_reason(eos_reason: str) -> FinishReason:
    """``max_new_tokens`` is the length limit; every other end (stop token or string, filter,
    loop detection) is a stop."""
    return FinishReason.LENGTH if eos_reason == "max_new_tokens" else FinishReason.STOP


def token_list(value: object) -> tuple[int, ...]:
    """Flatten token ids: a (1, n) tensor, nested lists, or None."""
    if value is None:
        return ()
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, int):
        return (value,)
    if not isinstance(value, list | tuple):
        raise TypeError(f"token ids of type {type(value).__name__}")
    return tuple(t for v in value for t in token_list(v))


def cache_utilization(used_pages: int, total_pages: int) -> float:
    """Share of the paged cache held by live jobs, 0..1 (0 for an empty or absent cache)."""
    if total_pages <= 0:
        return 0.0
    return min(max(used_pages / total_pages, 0.0), 1.0)
