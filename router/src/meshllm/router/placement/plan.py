"""Placement decisions on the router's view of the replicas; no I/O here.

Choices are deterministic (replicas in name order), so several routers placing the same model at
the same moment pick the same replicas, and each replica's own idempotent load makes the second
request a no-op instead of a second copy.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshllm.api.types import ReplicaState
from meshllm.router.placement.catalog import CatalogModel
from meshllm.router.registry import Replica

IDLE = frozenset({ReplicaState.EMPTY, ReplicaState.FAILED})
# Freed first when scaling down: replicas not serving yet, then those already draining, then the
# least busy of the ready ones.
_FREE_ORDER = {ReplicaState.FAILED: 0, ReplicaState.LOADING: 1, ReplicaState.DRAINING: 2}


def usable(replica: Replica, now: float, stale_after_s: float) -> bool:
    """Listed, connected and reporting: the router may act on what it reports."""
    return not replica.removed and replica.fresh(now, stale_after_s)


def hosting(replicas: Iterable[Replica], model: str) -> list[Replica]:
    """Replicas holding, loading or about to load ``model`` (drained ones included)."""
    return sorted((r for r in replicas if r.model == model), key=lambda r: r.name)


def idle(
    replicas: Iterable[Replica], entry: CatalogModel, now: float, stale_after_s: float
) -> list[Replica]:
    """Replicas that may take ``entry`` now: usable, empty (or failed), on a fitting device."""
    return sorted(
        (
            r
            for r in replicas
            if usable(r, now, stale_after_s)
            and not r.claim
            and r.state in IDLE
            and entry.fits(r.device)
        ),
        key=lambda r: r.name,
    )


def to_load(
    replicas: Iterable[Replica], entry: CatalogModel, want: int, now: float, stale_after_s: float
) -> list[Replica]:
    """The idle replicas to load ``entry`` on so that ``want`` replicas host it (as many as there
    are)."""
    replicas = list(replicas)
    missing = want - len(hosting(replicas, entry.id))
    return idle(replicas, entry, now, stale_after_s)[: max(missing, 0)]


def to_unload(replicas: Iterable[Replica], model: str, keep: int) -> list[Replica]:
    """Replicas to free so that ``keep`` host ``model``: the ones doing the least useful work."""
    ranked = sorted(
        hosting(replicas, model),
        key=lambda r: (_FREE_ORDER.get(r.state, 3), r.inflight + r.others_requests, r.name),
    )
    return ranked[: max(len(ranked) - keep, 0)]


def pending(
    replicas: Iterable[Replica],
    entry: CatalogModel,
    want: int,
    now: float,
    stale_after_s: float,
    *,
    failure: str = "",
) -> str:
    """Why fewer than ``want`` replicas serve ``entry`` ("" when none is missing)."""
    replicas = list(replicas)
    held = hosting(replicas, entry.id)
    ready = sum(r.state == ReplicaState.READY and not r.leaving for r in held)
    if ready >= want:
        return ""
    reasons = []
    if loading := sum(r.claim == entry.id or r.state == ReplicaState.LOADING for r in held):
        reasons.append(f"{loading} loading")
    if drained := sum(r.state == ReplicaState.DRAINING for r in held):
        reasons.append(f"{drained} draining")
    if failure:
        reasons.append(f"last load failed: {failure}")
    if len(held) < want and not idle(replicas, entry, now, stale_after_s):
        where = f" on {entry.device}" if entry.device else ""
        reasons.append(f"no idle replica{where} for {want - len(held)} more")
    return f"{ready} of {want} ready: " + "; ".join(reasons or ["waiting for reports"])
