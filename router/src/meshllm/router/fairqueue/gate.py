"""The router's fair queue: requests wait here, not in a replica's first-come queue, while every
replica of their model is saturated; a freed slot goes to the next in ``FairQueue`` order.

A request takes a ``Ticket`` before its first attempt and gives it back when it ends. Slots are
counted from the registry (this router's in-flight requests plus other routers' from the
reports, against each replica's reported capacity), so the queue wakes on every registry change:
a request ending, a report, a replica joining or leaving.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from meshllm.api.errors import DeadlineExceeded, MeshError, ResourceExhausted
from meshllm.router.config import QueueConfig
from meshllm.router.fairqueue.fair import FairQueue, Waiter
from meshllm.router.fairqueue.room import reserved, total_capacity, total_room
from meshllm.router.registry import Registry, Replica
from meshllm.router.tenants import Tenant
from meshllm.server.metrics import LATENCY_BUCKETS

RATE_WINDOW_S = 10.0
"""Slots freed over this long give the rate that predicts a wait."""
MIN_RATE_SAMPLES = 5
"""Fewer freed slots than this in the window: no prediction, so no early refusal."""
ACTIVE_S = 2.0
"""A tenant with a request running, waiting or ended this recently shares the capacity."""


class QueueMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.waiting = Gauge(
            "meshllm_router_queued_requests",
            "Requests waiting in the router's fair queue for a saturated model.",
            ["model"],
            registry=registry,
        )
        self.wait = Histogram(
            "meshllm_router_queue_wait_seconds",
            "Time requests waited in the router's fair queue (0 for those that did not wait).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.refusals = Counter(
            "meshllm_router_queue_refusals",
            "Requests the fair queue refused, by tenant and reason (SHED, QUEUE_FULL, "
            "QUEUE_WAIT_EXCEEDED, QUEUE_WAIT_EXCEEDS_DEADLINE).",
            ["model", "tenant", "reason"],
            registry=registry,
        )


@dataclass
class ModelQueue:
    """One model's queue and the counts that pair with it."""

    queue: FairQueue = field(default_factory=FairQueue)
    granted: dict[Waiter, asyncio.Future[None]] = field(default_factory=dict)
    pending: int = 0
    """Slots given to requests that have not reached a replica yet."""
    freed: deque[float] = field(default_factory=deque)
    """When slots were freed, over the last ``RATE_WINDOW_S``."""
    unshared: dict[str, float] = field(default_factory=dict)
    """Counter increments not yet added to the counters routers share."""
    active: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Tenant -> (weight, when it last had a request start, wait or end)."""
    elsewhere: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Tenant -> (weight, requests running) on the other routers sharing counters, as their
    last sync said (``shared.SharedCounters``)."""

    def seen(self, tenant: Tenant, now: float) -> None:
        self.active[tenant.name] = (tenant.weight, now)

    def prune(self, now: float) -> None:
        """Forget tenants with nothing running or waiting for ``ACTIVE_S``."""
        for name, (_, last) in list(self.active.items()):
            if (
                now - last > ACTIVE_S
                and not self.queue.running(name)
                and not self.queue.waiting(name)
            ):
                del self.active[name]

    def under_share(self, slots: int, now: float) -> set[str]:
        """The tenants (on every router) running fewer requests than their weight's share of
        ``slots`` among the tenants active lately (on any router)."""
        self.prune(now)
        weights = {name: w for name, (w, _) in self.active.items()}
        weights |= {name: w for name, (w, _) in self.elsewhere.items()}
        total = sum(weights.values())
        return {
            name for name, weight in weights.items() if self._running(name) < slots * weight / total
        }

    def running_under_share(self, under: set[str]) -> int:
        """Requests on this router of its tenants in ``under``. A tenant under its share on
        another router keeps the whole reserve: what it runs there now is known here only as
        of the last sync, and a slot it frees would be taken from it."""
        return sum(self.queue.running(n) for n in self.active if n in under)

    def _running(self, tenant: str) -> int:
        return self.queue.running(tenant) + self.elsewhere.get(tenant, (0.0, 0))[1]

    def slot_freed(self, now: float) -> None:
        self.freed.append(now)
        self._forget_freed(now)

    def _forget_freed(self, now: float) -> None:
        while self.freed and self.freed[0] < now - RATE_WINDOW_S:
            self.freed.popleft()

    def rate(self, now: float) -> float | None:
        """Slots freed per second lately, or None when too few to tell."""
        self._forget_freed(now)
        if len(self.freed) < MIN_RATE_SAMPLES:
            return None
        return len(self.freed) / max(now - self.freed[0], 1e-3)


class Ticket:
    """A request's slot: ``on_replica()`` when its first attempt is sent, ``served(n)`` for each
    n tokens it gets, ``close()`` when it ends (however)."""

    def __init__(
        self, gate: AdmissionQueue | None, model: str, tenant: Tenant, estimate: int
    ) -> None:
        self._gate, self._model, self._tenant = gate, model, tenant
        self._estimate = estimate
        self._pending = gate is not None
        self._closed = False
        self.waited_s = 0.0
        self.prompt_tokens = 0
        """The prompt's tokens as the replica counted them (its usage), once known."""
        if gate is not None:
            gate.charge(model, tenant, estimate)

    def on_replica(self) -> None:
        if self._pending and self._gate is not None:
            self._pending = False
            self._gate.reached_replica(self._model)

    def served(self, tokens: int) -> None:
        if self._gate is not None:
            self._gate.charge(self._model, self._tenant, tokens)

    def close(self) -> None:
        """Give the slot back; the prompt's real count, when known, corrects the estimate
        charged at the start."""
        if self._closed or self._gate is None:
            return
        self._closed = True
        if self.prompt_tokens:
            self._gate.charge(self._model, self._tenant, self.prompt_tokens - self._estimate)
        self._gate.release(self._model, self._tenant.name, self._pending)


class AdmissionQueue:
    """Gives each request of a saturated model its slot in fair order, or a clear refusal."""

    def __init__(
        self,
        registry: Registry,
        config: QueueConfig,
        metrics: QueueMetrics,
        *,
        retry_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry, self._config, self._metrics = registry, config, metrics
        self._retry_s, self._clock = retry_after_s, clock
        self.models: dict[str, ModelQueue] = {}
        registry.changes.subscribe(self.dispatch)

    def now(self) -> float:
        return self._clock()

    def ticket(self, model: str, tenant: Tenant, estimate: int) -> Ticket:
        """A slot without waiting (the queue is off or the model has no replica to count)."""
        return Ticket(None, model, tenant, estimate)

    async def admit(
        self,
        model: str,
        tenant: Tenant,
        *,
        priority: int,
        estimate: int,
        time_remaining: Callable[[], float | None],
    ) -> Ticket:
        """Wait for a slot of ``model``; ``estimate``: tokens charged at once (the prompt's)."""
        if not self._config.enabled:
            return self.ticket(model, tenant, estimate)
        candidates = self._registry.candidates(model)
        if not candidates:  # the picker explains why (unknown, loading, none healthy)
            return self.ticket(model, tenant, estimate)
        m = self.models.setdefault(model, ModelQueue())
        m.seen(tenant, self._clock())
        if self._free(m, candidates, tenant.name, queued=bool(len(m.queue))):
            m.pending += 1
            m.queue.started(tenant.name)
            self._metrics.wait.labels(model).observe(0.0)
            return Ticket(self, model, tenant, estimate)
        waited = await self._wait(m, model, tenant, priority, time_remaining)
        ticket = Ticket(self, model, tenant, estimate)
        ticket.waited_s = waited
        return ticket

    async def _wait(
        self,
        m: ModelQueue,
        model: str,
        tenant: Tenant,
        priority: int,
        time_remaining: Callable[[], float | None],
    ) -> float:
        self._refuse_at_once(m, model, tenant, priority)
        start = self._clock()
        waiter = Waiter(tenant=tenant.name, lane=priority)
        if lift := m.queue.push(waiter):  # other routers lift it too
            m.unshared[tenant.name] = m.unshared.get(tenant.name, 0.0) + lift
        future = m.granted[waiter] = asyncio.get_running_loop().create_future()
        self._metrics.waiting.labels(model).inc()
        try:
            self._refuse_unmeetable(m, model, tenant, waiter, time_remaining())
            self.dispatch()
            limit = tenant.max_queue_wait_s or self._config.max_wait_s
            remaining = time_remaining()
            try:
                async with asyncio.timeout(limit if remaining is None else min(limit, remaining)):
                    await future
            except TimeoutError:
                raise self._timed_out(model, tenant, limit, time_remaining()) from None
        except BaseException:
            m.granted.pop(waiter, None)
            if future.done() and not future.cancelled():  # the slot came as it gave up
                self.release(model, tenant.name, pending=True)
            else:
                future.cancel()
                m.queue.remove(waiter)
            raise
        finally:
            self._metrics.waiting.labels(model).dec()
        waited = self._clock() - start
        self._metrics.wait.labels(model).observe(waited)
        return waited

    def _free(self, m: ModelQueue, candidates: list[Replica], tenant: str, *, queued: bool) -> bool:
        """Whether a request of ``tenant`` may go now. A tenant under its fair share may take
        any free slot, ahead of waiters; any other only when none waits before it and more
        slots are free than the reserve still keeps (its slots not used by such tenants)."""
        c = self._config
        free = total_room(candidates, c.replica_queue) - m.pending
        if free <= 0:
            return False
        kept = reserved(candidates, c.reserve)
        if not queued and free > kept:  # room beyond the whole reserve: nobody's share matters
            return True
        if not c.reserve:
            return False
        under = m.under_share(total_capacity(candidates), self._clock())
        if tenant in under:
            return True
        return not queued and free > kept - m.running_under_share(under)

    def dispatch(self) -> None:
        """Give free slots to waiters, in order (run on every registry change)."""
        for model, m in self.models.items():
            if not m.granted:
                continue
            candidates = self._registry.candidates(model)
            # No replica left: let the waiters go, the picker's error says why.
            while (head := m.queue.peek()) is not None and (
                not candidates or self._free(m, candidates, head.tenant, queued=False)
            ):
                m.queue.pop()
                future = m.granted.pop(head)
                if not future.done():
                    future.set_result(None)
                    m.pending += 1

    def reached_replica(self, model: str) -> None:
        self.models[model].pending -= 1

    def release(self, model: str, tenant: str, pending: bool) -> None:
        m = self.models[model]
        if tenant in m.active:
            m.active[tenant] = (m.active[tenant][0], self._clock())
        if pending:
            m.pending -= 1
        m.queue.finished(tenant)
        m.slot_freed(self._clock())
        self.dispatch()

    def charge(self, model: str, tenant: Tenant, tokens: float) -> None:
        m = self.models.get(model)
        if m is None:
            return
        m.queue.charge(tenant.name, tokens, tenant.weight)
        m.unshared[tenant.name] = m.unshared.get(tenant.name, 0.0) + tokens / tenant.weight

    # -- refusals -------------------------------------------------------------------------------

    def _refuse_at_once(self, m: ModelQueue, model: str, tenant: Tenant, priority: int) -> None:
        where = {"model": model, "tenant": tenant.name}
        if priority < 0:
            self._refuse(
                model,
                tenant,
                ResourceExhausted(
                    f"model {model!r} is saturated: sheddable requests (priority {priority} < 0) "
                    "are refused, not queued",
                    reason="SHED",
                    retry_after=self._next_slot_s(m),
                    metadata=where,
                ),
            )
        own = tenant.max_queued or self._config.max_queued
        if m.queue.waiting(tenant.name) >= own:
            self._refuse(
                model,
                tenant,
                ResourceExhausted(
                    f"tenant {tenant.name!r} already has {own} requests waiting for {model!r} "
                    "(its max_queued)",
                    reason="QUEUE_FULL",
                    retry_after=self._wait_s(m, own),
                    metadata=where,
                ),
            )
        total = sum(len(q.queue) for q in self.models.values())
        if total >= self._config.max_total:
            self._refuse(
                model,
                tenant,
                ResourceExhausted(
                    f"the router's queue is full ({total} requests waiting)",
                    reason="QUEUE_FULL",
                    retry_after=self._wait_s(m, len(m.queue)),
                    metadata=where,
                ),
            )

    def _refuse_unmeetable(
        self, m: ModelQueue, model: str, tenant: Tenant, waiter: Waiter, remaining: float | None
    ) -> None:
        rate = m.rate(self._clock())
        if remaining is None or rate is None:
            return
        expected = (m.queue.ahead(waiter) + 1) / rate
        if expected > remaining:
            self._refuse(
                model,
                tenant,
                DeadlineExceeded(
                    f"model {model!r} is saturated: the expected wait for a slot, "
                    f"{expected:.2f}s, is longer than the {remaining:.2f}s left to the deadline",
                    reason="QUEUE_WAIT_EXCEEDS_DEADLINE",
                    metadata={"model": model, "expected_wait_s": f"{expected:.3f}"},
                ),
            )

    def _timed_out(
        self, model: str, tenant: Tenant, limit: float, remaining: float | None
    ) -> MeshError:
        if remaining is not None and remaining <= 0:
            error: MeshError = DeadlineExceeded(
                f"deadline exceeded while waiting for a slot of {model!r}",
                reason="QUEUE_WAIT_EXCEEDS_DEADLINE",
                metadata={"model": model},
            )
        else:
            error = ResourceExhausted(
                f"no slot of {model!r} freed within {limit:.1f}s (max_queue_wait_s)",
                reason="QUEUE_WAIT_EXCEEDED",
                retry_after=self._retry_s,
                metadata={"model": model, "tenant": tenant.name},
            )
        self._metrics.refusals.labels(model, tenant.name, error.reason).inc()
        return error

    def _refuse(self, model: str, tenant: Tenant, error: MeshError) -> None:
        self._metrics.refusals.labels(model, tenant.name, error.reason).inc()
        raise error

    def _next_slot_s(self, m: ModelQueue) -> float:
        return self._wait_s(m, 1)

    def _wait_s(self, m: ModelQueue, slots: int) -> float:
        """Seconds until ``slots`` more slots are expected to free (the default when unknown)."""
        rate = m.rate(self._clock())
        if rate is None:
            return self._retry_s
        return min(max(slots / rate, 0.05), 60.0)
