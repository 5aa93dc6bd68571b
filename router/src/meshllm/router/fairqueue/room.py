"""How many more requests a model's replicas can take before they must queue. No I/O.

A replica reports its capacity (the requests its engine runs at once); its load in requests is
this router's own in-flight count plus what the last report showed beyond it (other routers').
Up to ``capacity + replica_queue`` the router sends at once; past that on every replica a
request waits in the router's fair queue instead of in one replica's first-come queue.

A share of each replica's capacity (``reserve``) is kept free or for tenants running fewer
requests than their fair share (``gate``): a flood fills the rest, and a light tenant's next
request finds a slot free at once instead of waiting for the flood's next one to end.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshllm.router.registry import Replica

UNBOUNDED = 1 << 30
"""The room of a replica that reports no capacity: the router never holds its requests."""


def capacity(replica: Replica) -> int:
    return replica.report.capacity if replica.report is not None else 0


def room(replica: Replica, replica_queue: int) -> int:
    """Requests ``replica`` may still be sent before it is saturated."""
    slots = capacity(replica)
    if slots <= 0:
        return UNBOUNDED
    return max(slots + replica_queue - replica.inflight - replica.others_requests, 0)


def total_room(replicas: Iterable[Replica], replica_queue: int) -> int:
    return min(sum(room(r, replica_queue) for r in replicas), UNBOUNDED)


def reserved(replicas: Iterable[Replica], reserve: float) -> int:
    """The slots of ``replicas`` kept for tenants under their share: ``reserve`` of each one's."""
    return sum(int(capacity(r) * reserve) for r in replicas)


def total_capacity(replicas: Iterable[Replica]) -> int:
    """The slots of ``replicas`` together (UNBOUNDED when one does not say)."""
    slots = [capacity(r) for r in replicas]
    return UNBOUNDED if not slots or min(slots) <= 0 else sum(slots)
