"""A loaded model: tokenizer plus engine, turning requests into streams of chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from meshllm.api.errors import FailedPrecondition, Internal, ResourceExhausted, Unavailable
from meshllm.api.spec import BUILTIN_MODELS, DEFAULT_CONTEXT_LENGTH, DEFAULT_MAX_QUEUED, ModelSpec
from meshllm.api.types import FinishReason, ModelInfo, Timing, Usage
from meshllm.replica.engines import Engine, EngineSettings, TokenStream, create_engine
from meshllm.replica.engines.process import EngineDied, ProcessEngine
from meshllm.replica.stops import StopMatcher
from meshllm.replica.tokenizer import (
    IncrementalDetokenizer,
    ModelTokenizer,
    config_sampling_defaults,
)
from meshllm.replica.types import ChatMessage, Chunk, GenerationRequest, PreparedRequest
from meshllm.replica.validation import (
    Limits,
    check_fits,
    check_input,
    input_chars,
    resolve_sampling,
)

_BIG_INPUT_CHARS = 20_000  # tokenize bigger inputs off the event loop,
_MANY_MESSAGES = 64  # and chats whose template renders many messages


def resolve_model_dir(path: str) -> Path:
    """``demo``/``bench`` build (once, cached) a generated model, ``smollm2`` converts (once,
    cached) the fetched real model; anything else is a folder."""
    if path == "smollm2":
        from meshllm.replica.models import smollm2

        return smollm2.ensure_model()
    if path in BUILTIN_MODELS:
        from meshllm.replica.models.tiny import RECIPES, ensure_model

        return ensure_model(RECIPES[path])
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FailedPrecondition(
            f"model path {path!r} is not a directory", reason="MODEL_PATH_MISSING"
        )
    return folder


class LoadedModel:
    """One model on one device. Build with :meth:`load` (blocking: run it in a thread)."""

    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: ModelTokenizer,
        engine: Engine,
        limits: Limits,
        replica_name: str,
        *,
        default_coalesce_ms: int = 0,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.engine = engine
        self.limits = limits
        self.replica_name = replica_name
        self.max_queued = spec.max_queued or DEFAULT_MAX_QUEUED
        self.default_coalesce_ms = default_coalesce_ms

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        *,
        device: str,
        replica_name: str,
        max_input_chars: int,
        batch_window_ms: float,
        default_coalesce_ms: int = 0,
        engine_process: bool = True,
    ) -> LoadedModel:
        folder = resolve_model_dir(spec.path)
        try:
            tokenizer = ModelTokenizer(folder, spec.chat_template)
            defaults = config_sampling_defaults(folder)
        except FileNotFoundError as e:
            raise FailedPrecondition(str(e), reason="TOKENIZER_MISSING") from e
        except ValueError as e:  # a config file that is not JSON, or an eos_token_id that is no id
            raise FailedPrecondition(str(e), reason="MODEL_CONFIG_INVALID") from e
        cfg_len = tokenizer.config.get("model_max_length")
        context = spec.context_length or (
            int(cfg_len)
            if isinstance(cfg_len, int | float) and 0 < cfg_len < 10**7
            else DEFAULT_CONTEXT_LENGTH
        )
        limit = min(spec.max_tokens_limit or context, context)
        limits = Limits(
            context_length=context,
            default_max_tokens=min(spec.max_tokens_default, limit),
            max_tokens_limit=limit,
            vocab_size=tokenizer.vocab_size,
            max_input_chars=max_input_chars,
            defaults=defaults,
        )
        settings = EngineSettings(
            model_dir=folder,
            device=device,
            compute_type=spec.compute_type,
            max_batch_size=spec.max_batch_size,
            inter_threads=spec.inter_threads,
            intra_threads=spec.intra_threads,
            context_length=context,
            batch_window_ms=batch_window_ms,
            eos_ids=tokenizer.eos_ids,
            vocabulary=tuple(tokenizer.tokens(range(tokenizer.vocab_size))),
            options=dict(spec.options),
        )
        engine = (
            ProcessEngine(spec.engine, settings)
            if engine_process
            else create_engine(spec.engine, settings)
        )
        return cls(
            spec, tokenizer, engine, limits, replica_name, default_coalesce_ms=default_coalesce_ms
        )

    def info(self) -> ModelInfo:
        return ModelInfo(
            id=self.spec.id,
            engine=self.spec.engine,
            context_length=self.limits.context_length,
            max_tokens_limit=self.limits.max_tokens_limit,
        )

    async def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """Validate and tokenize; raises InvalidArgument with field violations."""
        check_input(req, self.limits)
        check_fits(req, self.limits, self.tokenizer.max_token_chars)
        if input_chars(req) > _BIG_INPUT_CHARS or len(req.messages) > _MANY_MESSAGES:
            ids = await asyncio.to_thread(self._tokenize, req)
        else:
            ids = self._tokenize(req)
        sampling = resolve_sampling(req, self.limits, len(ids))
        asked = req.coalesce_tokens or req.coalesce_ms
        return PreparedRequest(
            request_id=req.request_id,
            prompt_ids=tuple(ids),
            sampling=sampling,
            priority=req.priority,
            coalesce_tokens=req.coalesce_tokens,
            coalesce_ms=req.coalesce_ms if asked else self.default_coalesce_ms,
        )

    def _tokenize(self, req: GenerationRequest) -> list[int]:
        if req.token_ids:
            return list(req.token_ids)
        if req.messages:
            messages = list(req.messages)
            if req.instructions:
                messages.insert(0, ChatMessage("system", req.instructions))
            return self.tokenizer.encode_chat(messages)
        prompt = f"{req.instructions}\n\n{req.prompt}" if req.instructions else req.prompt
        return self.tokenizer.encode(prompt)

    async def stream(self, req: PreparedRequest) -> AsyncIterator[Chunk]:
        """Generate, yielding text deltas; the last chunk has finish reason, usage and timing."""
        if self.engine.stats().queued >= self.max_queued:
            raise ResourceExhausted(
                f"replica queue is full ({self.max_queued} waiting)",
                reason="QUEUE_FULL",
                retry_after=1.0,
            )
        stream = self.engine.submit(req.prompt_ids, req.sampling, req.priority)
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(req.sampling.stop)
        want, wait_s = _coalescing(req)
        first = True
        held_ids: list[int] = []  # ids read together with a stop string go in the last chunk
        tail = ""
        try:
            while True:
                ids = await stream.read(1 if first else want, wait_s)
                if not ids:
                    break
                text = stops.feed(detok.add(ids))
                if stops.matched:
                    stream.cancel()
                    held_ids, tail = ids, text
                    break
                # the contract names the model on the first chunk and the last
                yield Chunk(text=text, token_ids=tuple(ids), model=self.spec.id if first else "")
                first = False
            if not stops.matched:
                tail = stops.feed(detok.flush()) + stops.flush()
            yield self._final_chunk(stream, req, tail, stops.matched, held_ids)
        finally:
            stream.cancel()  # client gone or error: stop generating (no-op when finished)

    def _final_chunk(
        self, stream: TokenStream, req: PreparedRequest, text: str, stop: str, ids: list[int]
    ) -> Chunk:
        if isinstance(stream.error, EngineDied):
            raise _engine_died(stream.error, stream.generated)
        if stream.error is not None:
            raise Internal(f"engine failed: {type(stream.error).__name__}: {stream.error}")
        if stream.finish_reason == FinishReason.CANCELLED and not stop:
            raise _cut_short(stream.generated)  # the client's own cancel never gets here
        reason = FinishReason.STOP if stop else (stream.finish_reason or FinishReason.STOP)
        end = time.perf_counter()
        started = stream.started or end
        first = stream.first_token or end
        last = stream.last_token or end
        decode_s = max(last - first, 0.0)
        timing = Timing(
            queue_wait_ms=(started - stream.created) * 1e3,
            time_to_first_token_ms=(first - stream.created) * 1e3,
            decode_ms=decode_s * 1e3,
            total_ms=(end - stream.created) * 1e3,
            tokens_per_second=(stream.generated - 1) / decode_s if decode_s > 0 else 0.0,
            replica=self.replica_name,
        )
        usage = Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=stream.generated)
        return Chunk(
            text=text,
            token_ids=tuple(ids),
            finish_reason=reason,
            stop_sequence=stop,
            usage=usage,
            timing=timing,
            model=self.spec.id,
        )

    async def close(self) -> None:
        await self.engine.close()


def _engine_died(error: EngineDied, streamed: int) -> Unavailable:
    """Before the first token, another replica can take the request (the router retries
    UNAVAILABLE); after it, the reply is cut short and must never look complete."""
    if streamed == 0:
        return Unavailable(
            f"{error}; retry on another replica", reason="ENGINE_DIED", retry_after=1.0
        )
    return Unavailable(
        f"{error} after {streamed} tokens; the reply is incomplete",
        reason="STREAM_INTERRUPTED",
        metadata={"tokens_streamed": str(streamed)},
    )


def _cut_short(streamed: int) -> Unavailable:
    """The replica ended the request itself (unload or shutdown past its drain timeout): an
    error status, never a reply that ends OK with fewer tokens than asked."""
    if streamed == 0:
        return Unavailable(
            "the replica stopped serving before this request's first token; "
            "retry on another replica",
            reason="REPLICA_DRAINING",
            retry_after=1.0,
        )
    return Unavailable(
        f"the replica stopped serving (drain timeout) after {streamed} tokens; "
        "the reply is incomplete",
        reason="STREAM_INTERRUPTED",
        metadata={"tokens_streamed": str(streamed)},
    )


def _coalescing(req: PreparedRequest) -> tuple[int, float]:
    """(tokens to wait for, longest hold in seconds) after the first chunk."""
    if req.coalesce_tokens:
        return req.coalesce_tokens, req.coalesce_ms / 1000.0
    if req.coalesce_ms:
        return 1 << 30, req.coalesce_ms / 1000.0
    return 1, 0.0
