"""Wire <-> domain for the shared vocabulary (``meshllm.api.types``, ``meshllm.api.spec``).

Every component converts through these functions; none keeps a table of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from meshllm.api.spec import SPEC_FIELDS, ModelSpec
from meshllm.api.types import (
    DeviceMemory,
    FinishReason,
    LoadReport,
    ModelInfo,
    ModelPlacement,
    QuotaUsage,
    ReplicaState,
    ReplicaStatus,
    Timing,
    Usage,
)
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import replica_control_pb2 as rc

D = TypeVar("D")

_FINISH = {
    FinishReason.STOP: gen.FINISH_REASON_STOP,
    FinishReason.LENGTH: gen.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: gen.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: gen.FINISH_REASON_ERROR,
}
_FINISH_FROM = {number: reason for reason, number in _FINISH.items()}
_STATE = {
    ReplicaState.UNKNOWN: rc.REPLICA_STATE_UNSPECIFIED,
    ReplicaState.EMPTY: rc.REPLICA_STATE_EMPTY,
    ReplicaState.LOADING: rc.REPLICA_STATE_LOADING,
    ReplicaState.READY: rc.REPLICA_STATE_READY,
    ReplicaState.DRAINING: rc.REPLICA_STATE_DRAINING,
    ReplicaState.UNLOADING: rc.REPLICA_STATE_UNLOADING,
    ReplicaState.FAILED: rc.REPLICA_STATE_FAILED,
}
_STATE_FROM = {number: state for state, number in _STATE.items()}


def _plain(obj: Any, **changes: Any) -> dict[str, Any]:
    """A domain dataclass's fields by name (the wire message has the same names)."""
    return {f.name: changes.get(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _read(kind: type[D], msg: Any, **changes: Any) -> D:
    """A domain dataclass from the same-named fields of a wire message."""
    names = (f.name for f in dataclasses.fields(kind))  # type: ignore[arg-type]
    return kind(**{n: changes[n] if n in changes else getattr(msg, n) for n in names})


# -- generation ------------------------------------------------------------------------------


def finish_to_pb(reason: FinishReason | None) -> gen.FinishReason:
    return _FINISH[reason] if reason is not None else gen.FINISH_REASON_UNSPECIFIED


def finish_from_pb(reason: gen.FinishReason) -> FinishReason | None:
    """None for UNSPECIFIED: the chunk is not the last one."""
    return _FINISH_FROM.get(reason)


def usage_to_pb(u: Usage) -> gen.Usage:
    return gen.Usage(**_plain(u), total_tokens=u.total_tokens)


def usage_from_pb(u: gen.Usage) -> Usage:
    return _read(Usage, u)


def timing_to_pb(t: Timing) -> gen.Timing:
    return gen.Timing(**_plain(t))


def timing_from_pb(t: gen.Timing) -> Timing:
    return _read(Timing, t)


def model_info_to_pb(m: ModelInfo) -> gen.ModelInfo:
    return gen.ModelInfo(**_plain(m))


def model_info_from_pb(m: gen.ModelInfo) -> ModelInfo:
    return _read(ModelInfo, m)


def response_from_chunks(chunks: list[gen.GenerateChunk]) -> gen.GenerateResponse:
    """A whole reply from its streamed chunks (the last carries finish reason, usage, timing)."""
    last = chunks[-1]
    return gen.GenerateResponse(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        request_id=last.request_id,
        finish_reason=last.finish_reason,
        stop_sequence=last.stop_sequence,
        usage=last.usage,
        timing=last.timing,
        model=last.model,
    )


# -- replica control ---------------------------------------------------------------------------


def state_to_pb(state: ReplicaState) -> rc.ReplicaState:
    return _STATE[state]


def state_from_pb(state: rc.ReplicaState) -> ReplicaState:
    return _STATE_FROM.get(state, ReplicaState.UNKNOWN)


_SCALARS = tuple(name for name in SPEC_FIELDS if name != "options")


def spec_to_pb(spec: ModelSpec) -> rc.ModelSpec:
    return rc.ModelSpec(**{n: getattr(spec, n) for n in _SCALARS}, options=dict(spec.options))


def spec_from_pb(msg: rc.ModelSpec) -> ModelSpec:
    """An unset engine is the default engine; every other unset field keeps its zero value."""
    values = {n: getattr(msg, n) for n in _SCALARS}
    values["engine"] = values["engine"] or ModelSpec.__dataclass_fields__["engine"].default
    return ModelSpec(**values, options=dict(msg.options))


def spec_overrides_from_pb(msg: rc.ModelSpec) -> dict[str, object]:
    """The set fields of ``msg`` (a load's one-off overrides; ``id`` only names the model)."""
    out: dict[str, object] = {n: getattr(msg, n) for n in _SCALARS if n != "id" and getattr(msg, n)}
    if msg.options:
        out["options"] = dict(msg.options)
    return out


def load_report_to_pb(r: LoadReport) -> rc.LoadReport:
    return rc.LoadReport(**_plain(r, state=_STATE[r.state]))


def load_report_from_pb(r: rc.LoadReport) -> LoadReport:
    return _read(LoadReport, r, state=state_from_pb(r.state))


def memory_to_pb(m: DeviceMemory) -> rc.DeviceMemory:
    return rc.DeviceMemory(**_plain(m))


def status_to_pb(s: ReplicaStatus) -> rc.ReplicaStatus:
    out = rc.ReplicaStatus(
        replica_id=s.replica_id,
        state=_STATE[s.state],
        device=s.device,
        error=s.error,
        version=s.version,
    )
    if s.spec is not None:
        out.spec.CopyFrom(spec_to_pb(s.spec))
    if s.load is not None:
        out.load.CopyFrom(load_report_to_pb(s.load))
    if s.memory is not None:
        out.memory.CopyFrom(memory_to_pb(s.memory))
    return out


def status_from_pb(s: rc.ReplicaStatus) -> ReplicaStatus:
    return _read(
        ReplicaStatus,
        s,
        state=state_from_pb(s.state),
        spec=spec_from_pb(s.spec) if s.HasField("spec") and s.spec.id else None,
        load=load_report_from_pb(s.load) if s.HasField("load") else None,
        memory=_read(DeviceMemory, s.memory) if s.HasField("memory") else None,
    )


# -- admin -----------------------------------------------------------------------------------


def placement_to_pb(p: ModelPlacement) -> adm.ModelPlacement:
    return adm.ModelPlacement(**_plain(p, replicas=[status_to_pb(s) for s in p.replicas]))


def placement_from_pb(p: adm.ModelPlacement) -> ModelPlacement:
    return _read(ModelPlacement, p, replicas=tuple(status_from_pb(s) for s in p.replicas))


def quota_usage_to_pb(u: QuotaUsage) -> adm.QuotaUsage:
    return adm.QuotaUsage(**_plain(u))


def quota_usage_from_pb(u: adm.QuotaUsage) -> QuotaUsage:
    return _read(QuotaUsage, u)
