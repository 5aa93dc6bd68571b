"""How many more requests a model's replicas can take before they must queue. No I/O.

A replica reports its capacity (the requests its engine runs at once); its load in requests is
this router's own in-flight count plus what the last report showed beyond it (other routers').
Up to ``capacity + replica_queue`` the router sends at once; past that on every replica a
request waits in the router's fair queue instead of in one replica's first-come queue.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshllm.router.registry import Replica

UNBOUNDED = 1 << 30
"""The room of a replica that reports no capacity: the router never holds its requests."""


def room(replica: Replica, replica_queue: int) -> int:
    """Requests ``replica`` may still be sent before it is saturated."""
    capacity = replica.report.capacity if replica.report is not None else 0
    if capacity <= 0:
        return UNBOUNDED
    return max(capacity + replica_queue - replica.inflight - replica.others_requests, 0)


def total_room(replicas: Iterable[Replica], replica_queue: int) -> int:
    return min(sum(room(r, replica_queue) for r in replicas), UNBOUNDED)
