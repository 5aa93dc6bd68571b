"""The order of waiting requests: priority lanes first, then the tenant served least. No I/O.

Fairness is a virtual token counter per tenant (as in "Fairness in Serving Large Language
Models", Sheng et al., OSDI 2024): every token the mesh serves a tenant adds ``1 / weight`` to
its counter, and the next free slot goes to the waiting tenant with the lowest counter. A tenant
that was idle is lifted to the lowest counter among those waiting when it starts waiting again,
so idling banks no credit: it shares from now on, it does not get the past back.

Higher lanes (``GenerateRequest.priority``) go first, whatever the counters; within a lane the
counters decide, then the tenant with fewer requests running, then the one with fewer waiting
(a tenant just lifted ties with the flood it joins, and should not wait behind all of it), then
arrival order.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(eq=False, kw_only=True)
class Waiter:
    """One request waiting for a slot."""

    tenant: str
    lane: int
    """Its priority: higher lanes go first."""
    seq: int = 0


@dataclass
class _Tenant:
    served: float = 0.0
    """Tokens served divided by the weight: the virtual counter."""
    running: int = 0
    waiting: int = 0


@dataclass
class FairQueue:
    """The waiting requests of one model, in the order they get slots."""

    _lanes: dict[int, dict[str, deque[Waiter]]] = field(default_factory=dict)
    _tenants: dict[str, _Tenant] = field(default_factory=dict)
    _seq: Iterator[int] = field(default_factory=itertools.count)
    _floor: float = 0.0
    """The counter of the tenant served last: where an idle tenant starts when no one waits."""

    def __len__(self) -> int:
        return sum(t.waiting for t in self._tenants.values())

    def waiting(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return t.waiting if t is not None else 0

    def served(self, tenant: str) -> float:
        """The tenant's virtual counter."""
        t = self._tenants.get(tenant)
        return t.served if t is not None else 0.0

    def push(self, waiter: Waiter) -> float:
        """Queue ``waiter``; returns how far its tenant's counter was lifted (0 if not)."""
        t = self._tenant(waiter.tenant)
        before = t.served
        if not t.waiting:
            backlogged = [o.served for o in self._tenants.values() if o.waiting]
            t.served = max(t.served, min(backlogged) if backlogged else self._floor)
        waiter.seq = next(self._seq)
        t.waiting += 1
        self._lanes.setdefault(waiter.lane, {}).setdefault(waiter.tenant, deque()).append(waiter)
        return t.served - before

    def peek(self) -> Waiter | None:
        """The waiter that gets the next slot, left in place."""
        if not self._lanes:
            return None
        lane = self._lanes[max(self._lanes)]
        return lane[min(lane, key=lambda n: self._order(n, lane[n][0]))][0]

    def running(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return t.running if t is not None else 0

    def pop(self) -> Waiter | None:
        """The waiter that gets the next slot (counted as running), or None."""
        head = self.peek()
        if head is None:
            return None
        name = head.tenant
        waiter = self._lanes[head.lane][name].popleft()
        self._discard_empty(waiter)
        t = self._tenants[name]
        t.waiting -= 1
        t.running += 1
        self._floor = t.served
        return waiter

    def remove(self, waiter: Waiter) -> None:
        """Take out a waiter that gave up (cancelled, timed out)."""
        queue = self._lanes.get(waiter.lane, {}).get(waiter.tenant)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        self._discard_empty(waiter)
        self._tenants[waiter.tenant].waiting -= 1

    def started(self, tenant: str) -> None:
        """A request that never waited got a slot."""
        self._tenant(tenant).running += 1

    def finished(self, tenant: str) -> None:
        t = self._tenant(tenant)
        t.running = max(t.running - 1, 0)

    def charge(self, tenant: str, tokens: float, weight: float) -> None:
        """Count ``tokens`` served to ``tenant`` (negative: a correction of an estimate)."""
        self._tenant(tenant).served += tokens / weight

    def set_served(self, tenant: str, served: float) -> None:
        """Replace a counter (with the total several routers share)."""
        self._tenant(tenant).served = served

    def ahead(self, waiter: Waiter) -> int:
        """About how many waiters go before ``waiter``: those in higher lanes, those of tenants
        served less in its lane, and its own tenant's earlier ones."""
        mine = self._tenants[waiter.tenant].served
        count = 0
        for lane, queues in self._lanes.items():
            for name, queue in queues.items():
                if lane > waiter.lane or (lane == waiter.lane and self.served(name) < mine):
                    count += len(queue)
                elif lane == waiter.lane and name == waiter.tenant:
                    count += sum(1 for w in queue if w.seq < waiter.seq)
        return count

    def _order(self, name: str, head: Waiter) -> tuple[float, int, int, int]:
        t = self._tenants[name]
        return (t.served, t.running, t.waiting, head.seq)

    def _tenant(self, name: str) -> _Tenant:
        t = self._tenants.get(name)
        if t is None:
            t = self._tenants[name] = _Tenant()
        return t

    def _discard_empty(self, waiter: Waiter) -> None:
        lane = self._lanes[waiter.lane]
        if not lane[waiter.tenant]:
            del lane[waiter.tenant]
        if not lane:
            del self._lanes[waiter.lane]
