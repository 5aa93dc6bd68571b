"""Wire <-> domain conversion for the replica: protobuf types stop here."""

from __future__ import annotations

import uuid

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.replica.config import ModelSpec
from meshllm.replica.host import LoadReport, ReplicaState, ReplicaStatusInfo
from meshllm.replica.model import ModelInfo
from meshllm.replica.types import ChatMessage, Chunk, FinishReason, GenerationRequest

_FINISH = {
    None: gen.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: gen.FINISH_REASON_STOP,
    FinishReason.LENGTH: gen.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: gen.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: gen.FINISH_REASON_ERROR,
}
_STATE = {
    ReplicaState.EMPTY: rc.REPLICA_STATE_EMPTY,
    ReplicaState.LOADING: rc.REPLICA_STATE_LOADING,
    ReplicaState.READY: rc.REPLICA_STATE_READY,
    ReplicaState.DRAINING: rc.REPLICA_STATE_DRAINING,
    ReplicaState.UNLOADING: rc.REPLICA_STATE_UNLOADING,
    ReplicaState.FAILED: rc.REPLICA_STATE_FAILED,
}


def request_from_pb(msg: gen.GenerateRequest) -> GenerationRequest:
    def opt(name: str) -> object:
        return getattr(msg, name) if msg.HasField(name) else None

    return GenerationRequest(
        request_id=msg.request_id or uuid.uuid4().hex,
        model=msg.model,
        prompt=msg.prompt,
        messages=tuple(ChatMessage(m.role, m.content) for m in msg.messages),
        token_ids=tuple(msg.token_ids),
        instructions=msg.instructions,
        temperature=opt("temperature"),  # type: ignore[arg-type]
        top_k=opt("top_k"),  # type: ignore[arg-type]
        top_p=opt("top_p"),  # type: ignore[arg-type]
        repetition_penalty=opt("repetition_penalty"),  # type: ignore[arg-type]
        max_tokens=opt("max_tokens"),  # type: ignore[arg-type]
        stop=tuple(msg.stop),
        seed=opt("seed"),  # type: ignore[arg-type]
        priority=msg.priority,
        coalesce_tokens=msg.stream_options.coalesce_tokens,
        coalesce_ms=msg.stream_options.coalesce_ms,
    )


def chunk_to_pb(chunk: Chunk, request_id: str) -> gen.GenerateChunk:
    out = gen.GenerateChunk(text=chunk.text, token_ids=chunk.token_ids, request_id=request_id)
    if chunk.finish_reason is not None:
        out.finish_reason = _FINISH[chunk.finish_reason]
        out.stop_sequence = chunk.stop_sequence
        out.model = chunk.model
    if chunk.usage is not None:
        u = chunk.usage
        out.usage.CopyFrom(gen.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                     total_tokens=u.total_tokens))  # fmt: skip
    if chunk.timing is not None:
        t = chunk.timing
        out.timing.CopyFrom(gen.Timing(
            queue_wait_ms=t.queue_wait_ms, time_to_first_token_ms=t.time_to_first_token_ms,
            decode_ms=t.decode_ms, total_ms=t.total_ms, tokens_per_second=t.tokens_per_second,
            replica=t.replica,
        ))  # fmt: skip
    return out


def response_from_chunks(chunks: list[gen.GenerateChunk]) -> gen.GenerateResponse:
    last = chunks[-1]
    return gen.GenerateResponse(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        request_id=last.request_id, finish_reason=last.finish_reason,
        stop_sequence=last.stop_sequence, usage=last.usage, timing=last.timing, model=last.model,
    )  # fmt: skip


def model_info_to_pb(info: ModelInfo) -> gen.ModelInfo:
    return gen.ModelInfo(id=info.id, engine=info.engine, context_length=info.context_length,
                         max_tokens_limit=info.max_tokens_limit, ready_replicas=1)  # fmt: skip


def spec_from_pb(msg: rc.ModelSpec) -> ModelSpec:
    return ModelSpec(
        id=msg.id, path=msg.path, engine=msg.engine or "ctranslate2", compute_type=msg.compute_type,
        context_length=msg.context_length, default_max_tokens=msg.default_max_tokens,
        max_tokens_limit=msg.max_tokens_limit, max_batch_size=msg.max_batch_size,
        inter_threads=msg.inter_threads, intra_threads=msg.intra_threads,
        chat_template=msg.chat_template, max_queued=msg.max_queued, options=dict(msg.options),
    )  # fmt: skip


def spec_to_pb(spec: ModelSpec) -> rc.ModelSpec:
    return rc.ModelSpec(
        id=spec.id, path=spec.path, engine=spec.engine, compute_type=spec.compute_type,
        context_length=spec.context_length, default_max_tokens=spec.default_max_tokens,
        max_tokens_limit=spec.max_tokens_limit, max_batch_size=spec.max_batch_size,
        inter_threads=spec.inter_threads, intra_threads=spec.intra_threads,
        chat_template=spec.chat_template, max_queued=spec.max_queued, options=spec.options,
    )  # fmt: skip


def load_report_to_pb(r: LoadReport) -> rc.LoadReport:
    return rc.LoadReport(
        replica_id=r.replica_id, state=_STATE[r.state], model=r.model, queued=r.queued,
        running=r.running, tokens_in_flight=r.tokens_in_flight, tokens_per_second=r.tokens_per_second,
        cache_utilization=r.cache_utilization, requests_total=r.requests_total,
        tokens_total=r.tokens_total, timestamp_ms=r.timestamp_ms, device=r.device,
    )  # fmt: skip


def status_to_pb(s: ReplicaStatusInfo, version: str) -> rc.ReplicaStatus:
    m = s.memory
    out = rc.ReplicaStatus(
        replica_id=s.replica_id, state=_STATE[s.state], device=s.device, error=s.error,
        load=load_report_to_pb(s.load), version=version,
        memory=rc.DeviceMemory(device=m.device, used_bytes=m.used_bytes, total_bytes=m.total_bytes,
                               source=m.source),
    )  # fmt: skip
    if s.spec is not None:
        out.spec.CopyFrom(spec_to_pb(s.spec))
    return out
