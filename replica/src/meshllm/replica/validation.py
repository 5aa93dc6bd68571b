"""Request validation: every bad field is reported at once, as BadRequest field violations."""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshllm.api.bounds import identity_violations
from meshllm.api.errors import FieldViolation, InvalidArgument
from meshllm.replica.types import GenerationRequest, SamplingParams

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_ROLE_CHARS = 64
MAX_COALESCE_TOKENS = 4096
MAX_COALESCE_MS = 10_000


@dataclass(frozen=True, kw_only=True)
class SamplingDefaults:
    """What a request that leaves a sampling field unset gets: the model folder's
    ``generation_config.json`` values where it has them (as vLLM and transformers do), else
    plain sampling (temperature 1, no top-k/top-p cut, no repetition penalty)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Limits:
    """The loaded model's limits that requests are checked against."""

    context_length: int
    default_max_tokens: int
    max_tokens_limit: int
    vocab_size: int
    max_input_chars: int
    defaults: SamplingDefaults = SamplingDefaults()


def input_chars(req: GenerationRequest) -> int:
    """Characters of every text a request sends: prompt, instructions, each message's role and
    content, and the stop strings (all of it is read, rendered or matched)."""
    text = len(req.prompt) + len(req.instructions) + sum(len(s) for s in req.stop)
    return text + sum(len(m.role) + len(m.content) for m in req.messages)


def check_input(req: GenerationRequest, limits: Limits) -> None:
    """Exactly one input kind, within size limits."""
    bad: list[FieldViolation] = []
    inputs = {"prompt": req.prompt, "messages": req.messages, "token_ids": req.token_ids}
    given = [name for name, value in inputs.items() if value]
    if not given:
        bad.append(
            FieldViolation("prompt", "empty input: set one of prompt, messages or token_ids")
        )
    elif len(given) > 1:
        bad.append(
            FieldViolation(
                given[1], f"set only one of prompt, messages, token_ids (got {', '.join(given)})"
            )
        )
    chars = input_chars(req)
    if chars > limits.max_input_chars:
        bad.append(
            FieldViolation(
                "prompt", f"input is {chars} characters; the limit is {limits.max_input_chars}"
            )
        )
    if len(req.messages) > MAX_MESSAGES:
        bad.append(FieldViolation("messages", f"at most {MAX_MESSAGES} messages"))
    for i, m in enumerate(req.messages):
        if not m.role or len(m.role) > MAX_ROLE_CHARS:
            rule = f"must be 1 to {MAX_ROLE_CHARS} characters"
            bad.append(FieldViolation(f"messages[{i}].role", rule))
    if req.instructions and req.token_ids:
        why = "cannot go with token_ids (pre-tokenized input is used as is)"
        bad.append(FieldViolation("instructions", why))
    for i, t in enumerate(req.token_ids):
        if t >= limits.vocab_size:
            bad.append(
                FieldViolation(
                    f"token_ids[{i}]", f"{t} is not below the vocabulary size {limits.vocab_size}"
                )
            )
            break
    if not req.model:
        bad.append(FieldViolation("model", "must name a model (see ListModels)"))
    bad.extend(identity_violations(req.model, req.request_id))
    _raise(bad)


def check_fits(req: GenerationRequest, limits: Limits, max_token_chars: int) -> None:
    """Text that cannot fit the context whatever its tokenization is refused before it is
    tokenized: ``n`` characters are at least ``n / max_token_chars`` tokens."""
    if req.token_ids:
        return
    text = len(req.prompt) + len(req.instructions)
    text += sum(len(m.role) + len(m.content) for m in req.messages)
    floor = -(-text // max_token_chars)
    if floor >= limits.context_length:
        why = (
            f"input is {text} characters, at least {floor} tokens; "
            f"the model's context is {limits.context_length}"
        )
        _raise([FieldViolation("prompt", why)])


def check_identity(req: GenerationRequest) -> None:
    """The request's model and id are fit to log, label and echo (checked before anything is)."""
    _raise(identity_violations(req.model, req.request_id))


def resolve_sampling(req: GenerationRequest, limits: Limits, prompt_tokens: int) -> SamplingParams:
    """Apply defaults and check ranges; max_tokens left unset is clamped to the context left."""
    bad = _sampling_violations(req, limits) + _stream_violations(req)
    max_tokens = _max_tokens(req, limits, prompt_tokens, bad)
    _raise(bad)
    t, k, p, rp = req.temperature, req.top_k, req.top_p, req.repetition_penalty
    d = limits.defaults
    return SamplingParams(
        temperature=d.temperature if t is None else t,
        top_k=d.top_k if k is None else k,
        top_p=d.top_p if p is None else p,
        repetition_penalty=d.repetition_penalty if rp is None else rp,
        max_tokens=max_tokens,
        stop=req.stop,
        seed=req.seed,
    )


def _sampling_violations(req: GenerationRequest, limits: Limits) -> list[FieldViolation]:
    bad: list[FieldViolation] = []

    def check(name: str, value: float | None, ok: bool, rule: str) -> None:
        if value is not None and (not math.isfinite(value) or not ok):
            bad.append(FieldViolation(name, f"{value} is out of range: {rule}"))

    t, k, p, rp = req.temperature, req.top_k, req.top_p, req.repetition_penalty
    check("temperature", t, t is not None and 0.0 <= t <= 10.0, "0 <= temperature <= 10")
    vocab = limits.vocab_size
    check("top_k", k, k is not None and 0 <= k <= vocab, f"0 <= top_k <= {vocab}")
    check("top_p", p, p is not None and 0.0 < p <= 1.0, "0 < top_p <= 1")
    rule = "0 < repetition_penalty <= 10"
    check("repetition_penalty", rp, rp is not None and 0.0 < rp <= 10.0, rule)
    return bad


def _stream_violations(req: GenerationRequest) -> list[FieldViolation]:
    """Stop strings and stream options."""
    bad: list[FieldViolation] = []
    if len(req.stop) > MAX_STOP_STRINGS:
        bad.append(FieldViolation("stop", f"at most {MAX_STOP_STRINGS} stop strings"))
    for i, s in enumerate(req.stop):
        if not s or len(s) > MAX_STOP_CHARS:
            bad.append(FieldViolation(f"stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters"))
    if not 0 <= req.coalesce_tokens <= MAX_COALESCE_TOKENS:
        field = "stream_options.coalesce_tokens"
        bad.append(FieldViolation(field, f"at most {MAX_COALESCE_TOKENS}"))
    if not 0 <= req.coalesce_ms <= MAX_COALESCE_MS:
        bad.append(FieldViolation("stream_options.coalesce_ms", f"at most {MAX_COALESCE_MS}"))
    return bad


def _max_tokens(
    req: GenerationRequest, limits: Limits, prompt_tokens: int, bad: list[FieldViolation]
) -> int:
    """The request's max_tokens, or the default clamped to the room the prompt leaves; what
    does not fit is added to ``bad``."""
    context = limits.context_length
    room = context - prompt_tokens
    if room <= 0:
        why = f"prompt is {prompt_tokens} tokens; the model's context is {context}"
        bad.append(FieldViolation("prompt", why))
    max_tokens = req.max_tokens
    if max_tokens is None:
        return max(1, min(limits.default_max_tokens, room))
    if max_tokens < 1 or max_tokens > limits.max_tokens_limit:
        why = f"{max_tokens} is out of range: 1 <= max_tokens <= {limits.max_tokens_limit}"
        bad.append(FieldViolation("max_tokens", why))
    elif room > 0 and max_tokens > room:
        why = (
            f"prompt ({prompt_tokens}) + max_tokens ({max_tokens}) exceeds the context ({context})"
        )
        bad.append(FieldViolation("max_tokens", why))
    return max_tokens


def _raise(bad: list[FieldViolation]) -> None:
    if bad:
        message = "; ".join(f"{v.field}: {v.description}" for v in bad)
        raise InvalidArgument(message, field_violations=bad)
