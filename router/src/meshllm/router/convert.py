"""Wire <-> domain for the router: replica reports and statuses in, model listings out."""

from __future__ import annotations

from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.router.placement.catalog import CatalogModel
from meshllm.router.quota import LimitUsage
from meshllm.router.registry import LoadReport, Replica, ReplicaState, ServedModel

REPLICA_DEFAULT_MAX_TOKENS = 256  # what a replica uses when the spec leaves it unset

_STATES = {
    rc.REPLICA_STATE_EMPTY: ReplicaState.EMPTY,
    rc.REPLICA_STATE_LOADING: ReplicaState.LOADING,
    rc.REPLICA_STATE_READY: ReplicaState.READY,
    rc.REPLICA_STATE_DRAINING: ReplicaState.DRAINING,
    rc.REPLICA_STATE_UNLOADING: ReplicaState.UNLOADING,
    rc.REPLICA_STATE_FAILED: ReplicaState.FAILED,
}
_STATE_NUMBERS = {state: number for number, state in _STATES.items()}


def state_from_pb(state: rc.ReplicaState) -> ReplicaState:
    return _STATES.get(state, ReplicaState.UNKNOWN)


def report_from_pb(report: rc.LoadReport) -> LoadReport:
    return LoadReport(
        replica_id=report.replica_id, state=_STATES.get(report.state, ReplicaState.UNKNOWN),
        model=report.model, queued=report.queued, running=report.running,
        tokens_in_flight=report.tokens_in_flight, tokens_per_second=report.tokens_per_second,
        device=report.device,
    )  # fmt: skip


def served_from_pb(info: gen.ModelInfo, status: rc.ReplicaStatus) -> ServedModel:
    """The model a replica serves: resolved limits from its ListModels, defaults from its spec."""
    return ServedModel(
        id=info.id, engine=info.engine, context_length=info.context_length,
        max_tokens_limit=info.max_tokens_limit,
        default_max_tokens=status.spec.default_max_tokens or REPLICA_DEFAULT_MAX_TOKENS,
    )  # fmt: skip


def model_info_to_pb(model: str, replicas: list[Replica]) -> gen.ModelInfo:
    served = next(
        (r.served for r in replicas if r.served is not None and r.served.id == model), None
    )
    return gen.ModelInfo(
        id=model,
        engine=served.engine if served else "",
        context_length=served.context_length if served else 0,
        max_tokens_limit=served.max_tokens_limit if served else 0,
        ready_replicas=len(replicas),
    )


def replica_status_to_pb(replica: Replica) -> rc.ReplicaStatus:
    """What the router knows of a replica, for Admin.ListReplicas."""
    report = replica.report
    status = rc.ReplicaStatus(
        replica_id=replica.name, state=_STATE_NUMBERS.get(replica.state, rc.REPLICA_STATE_UNSPECIFIED),
        error=replica.last_error,
    )  # fmt: skip
    if replica.served is not None:
        status.spec.id, status.spec.engine = replica.served.id, replica.served.engine
    if report is not None:
        status.load.CopyFrom(rc.LoadReport(
            replica_id=report.replica_id, state=status.state, model=report.model, queued=report.queued,
            running=report.running, tokens_in_flight=report.tokens_in_flight,
            tokens_per_second=report.tokens_per_second,
        ))  # fmt: skip
    return status


def usage_to_pb(usage: LimitUsage) -> adm.QuotaUsage:
    return adm.QuotaUsage(tenant=usage.tenant, limit=usage.limit, used=usage.used,
                          limit_value=usage.limit_value, resets_in_s=usage.resets_in_s)  # fmt: skip


# ModelSpec's fields other than ``options``, each named as in CatalogModel (which has them all)
_SPEC_FIELDS = tuple(f.name for f in rc.ModelSpec.DESCRIPTOR.fields if f.name != "options")


def spec_to_pb(entry: CatalogModel) -> rc.ModelSpec:
    """What a replica loads for a catalog model."""
    fields = {name: getattr(entry, name) for name in _SPEC_FIELDS}
    return rc.ModelSpec(**fields, options=dict(entry.options))


def overrides_from_pb(spec: rc.ModelSpec) -> dict[str, object]:
    """A load's one-off overrides: the set fields of ``spec`` (the id only names the model)."""
    out: dict[str, object] = {
        name: getattr(spec, name) for name in _SPEC_FIELDS if name != "id" and getattr(spec, name)
    }
    if spec.options:
        out["options"] = dict(spec.options)
    return out


def placement_to_pb(model: str, statuses: list[rc.ReplicaStatus], entry: CatalogModel | None,
                    desired: int, pending: str) -> adm.ModelPlacement:  # fmt: skip
    """One model's placement: catalog settings and the replicas holding (or failing) it."""
    replicas = [s for s in statuses if s.spec.id == model and s.state != rc.REPLICA_STATE_EMPTY]
    return adm.ModelPlacement(
        model=model, configured=entry is not None, desired_replicas=desired,
        max_replicas=entry.max_replicas if entry else 0, replicas=replicas,
        ready_replicas=sum(s.state == rc.REPLICA_STATE_READY for s in replicas), pending=pending,
    )  # fmt: skip
