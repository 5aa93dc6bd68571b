"""Choosing the replica for the next attempt, or explaining why there is none. No I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshllm.api.bounds import UNKNOWN_MODEL_LABEL, shown
from meshllm.api.errors import FailedPrecondition, MeshError, NotFound, Unavailable
from meshllm.api.types import ReplicaState
from meshllm.router.balancer import Policy
from meshllm.router.fairqueue.room import room
from meshllm.router.placement import plan
from meshllm.router.pool import ReplicaLink, ReplicaPool
from meshllm.router.registry import Registry, Replica, ServedModel
from meshllm.router.route_key import RouteKey


class Picker:
    """The policy's pick among the replicas that serve a model, skipping those already tried,
    and those at capacity while another has a free slot (``replica_queue``: as the fair queue
    counts room; None: the queue is off, and so is this). ``policies``: a model's own (its catalog ``routing``); ``policy`` for the
    others."""

    def __init__(
        self,
        registry: Registry,
        pool: ReplicaPool,
        policy: Policy,
        *,
        catalog: frozenset[str],
        retry_after_s: float,
        policies: Mapping[str, Policy] | None = None,
        replica_queue: int | None = None,
    ) -> None:
        self._registry, self._pool, self._policy = registry, pool, policy
        self._catalog, self._retry_s = catalog, retry_after_s
        self._policies = dict(policies or {})
        self._replica_queue = replica_queue

    def pick(self, key: RouteKey, tried: Sequence[Replica]) -> ReplicaLink:
        """The replica for the next attempt, or the error that explains why there is none."""
        model, policy = key.model, self._policies.get(key.model, self._policy)
        while True:
            candidates = self._registry.candidates(model, exclude=tried)
            if not candidates:
                raise self.no_replica(model, tried)
            # A full replica would queue the request first come, first served, behind a flood
            # the fair queue holds back; least-busy's token term alone can prefer it.
            if self._replica_queue is not None:
                candidates = [
                    r for r in candidates if room(r, self._replica_queue) > 0
                ] or candidates
            replica = policy.pick(candidates, key)
            link = self._pool.link(replica)
            if link is not None:
                return link
            tried = [*tried, replica]  # removed between listing and picking

    def label(self, model: str) -> str:
        """The metrics label of a request for ``model``: its name when the catalog or some
        replica knows it, else one value for every name callers invent."""
        if model in self._catalog or self._registry.knows(model):
            return model
        return UNKNOWN_MODEL_LABEL

    def served(self, model: str) -> ServedModel | None:
        """The model as some replica serving it now reports it (before one is picked)."""
        for replica in self._registry.ready_models().get(model, ()):
            if replica.served is not None:
                return replica.served
        return None

    def no_replica(self, model: str, tried: Sequence[Replica]) -> MeshError:
        where = {"model": model}
        if tried:
            names = ", ".join(r.name for r in tried)
            return Unavailable(
                f"no replica could take the request for {model!r}: {len(tried)} tried ({names})",
                reason="NO_HEALTHY_REPLICA",
                retry_after=self._retry_s,
                metadata=where,
            )
        held = plan.hosting(self._registry.replicas.values(), model)
        states = {ReplicaState.LOADING if r.claim else r.state for r in held}
        if ReplicaState.LOADING in states:
            return Unavailable(
                f"model {model!r} is still loading",
                reason="MODEL_LOADING",
                retry_after=self._retry_s,
                metadata=where,
            )
        if not states and model in self._catalog:
            return FailedPrecondition(
                f"model {model!r} is in the catalog but loaded on no replica; an admin can load "
                f"it (meshllm admin load {model})",
                reason="MODEL_NOT_LOADED",
                metadata=where,
            )
        ready = self._registry.ready_models()
        if not states and (ready or self._catalog) and not self._registry.knows(model):
            available = sorted({*ready, *self._catalog})
            return NotFound(f"unknown model {shown(model)}; available: {', '.join(available)}")
        return Unavailable(
            f"no healthy replica serves {model!r} now",
            reason="NO_HEALTHY_REPLICA",
            retry_after=self._retry_s,
            metadata=where,
        )
