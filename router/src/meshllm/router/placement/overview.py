"""What runs where, as the Admin service shows it: each replica's own status (or the router's
view of one it cannot ask) and each model's placement. Reads only; domain types only."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from typing import TYPE_CHECKING

from meshllm.api.errors import MeshError
from meshllm.api.types import ModelPlacement, ReplicaState, ReplicaStatus
from meshllm.router.placement import plan
from meshllm.router.placement.loads import Clients
from meshllm.router.registry import Registry, Replica

if TYPE_CHECKING:
    from meshllm.router.placement.control import Placement


class Overview:
    def __init__(self, placement: Placement, registry: Registry, clients: Clients) -> None:
        self._placement, self._registry, self._clients = placement, registry, clients

    async def statuses(self) -> list[ReplicaStatus]:
        """Every replica's own status (model spec, error, device memory), or the router's view
        of it where the replica does not answer."""
        replicas = sorted(self._registry.replicas.values(), key=lambda r: r.name)
        return list(await asyncio.gather(*(self._status(r) for r in replicas)))

    async def _status(self, replica: Replica) -> ReplicaStatus:
        status = await self._asked(replica)
        if note := self._registry.outlier_note(replica):  # the replica cannot know of it
            return replace(status, error=f"{status.error}; {note}" if status.error else note)
        return status

    async def _asked(self, replica: Replica) -> ReplicaStatus:
        client = self._clients.client(replica)
        if client is not None and replica.connected:
            with contextlib.suppress(MeshError):
                status = await client.status(timeout=self._registry.stale_after_s)
                if replica.leaving and status.state == ReplicaState.READY:
                    return replace(status, state=ReplicaState.DRAINING)  # being unloaded here
                return status
        return router_view(replica)

    async def placements(self, only: str = "") -> list[ModelPlacement]:
        """Each catalog or loaded model (or just ``only``) across the replicas."""
        statuses = await self.statuses()
        loaded = {s.model for s in statuses if s.model and s.state != ReplicaState.EMPTY}
        models = [only] if only else sorted(set(self._placement.catalog) | loaded)
        return [self._one(m, statuses) for m in models]

    def _one(self, model: str, statuses: list[ReplicaStatus]) -> ModelPlacement:
        entry = self._placement.catalog.get(model)
        held = tuple(s for s in statuses if s.model == model and s.state != ReplicaState.EMPTY)
        return ModelPlacement(
            model=model,
            configured=entry is not None,
            desired_replicas=self._placement.desired.get(model, 0),
            max_replicas=entry.max_replicas if entry else 0,
            replicas=held,
            ready_replicas=sum(s.state == ReplicaState.READY for s in held),
            pending=self.pending(model),
        )

    def pending(self, model: str) -> str:
        entry = self._placement.catalog.get(model)
        if entry is None:
            return ""
        failure = self._placement.loads.failures.get(model)
        return plan.pending(
            self._registry.replicas.values(),
            entry,
            self._placement.desired[model],
            self._placement.now(),
            self._registry.stale_after_s,
            failure=failure.reason if failure else "",
        )


def router_view(replica: Replica) -> ReplicaStatus:
    """What the router knows of a replica it cannot ask: its last report and served model."""
    return ReplicaStatus(
        replica_id=replica.name,
        state=replica.state,
        error=replica.last_error,
        spec=replica.served.spec if replica.served is not None else None,
        load=replica.report,
        device=replica.device,
    )
