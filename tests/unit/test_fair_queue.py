"""Unit tests of the router's fair queue: the order (lanes, counters, lift), room per replica,
and the admission gate's grants and refusals on a registry without gRPC."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from prometheus_client import CollectorRegistry

from meshllm.api.errors import DeadlineExceeded, ResourceExhausted
from meshllm.api.types import LoadReport, ReplicaState
from meshllm.router.config import QueueConfig
from meshllm.router.fairqueue import AdmissionQueue, FairQueue, QueueMetrics, Ticket, Waiter
from meshllm.router.fairqueue.gate import ModelQueue
from meshllm.router.fairqueue.room import UNBOUNDED, room, total_room
from meshllm.router.quota.limits import TenantLimits
from meshllm.router.registry import Registry, Replica
from meshllm.router.tenants import Role, Tenant


def waiter(tenant: str, lane: int = 0) -> Waiter:
    return Waiter(tenant=tenant, lane=lane)


def order(queue: FairQueue) -> list[str]:
    out = []
    while (w := queue.pop()) is not None:
        out.append(w.tenant)
    return out


# --- the order -----------------------------------------------------------------------------------


def test_the_tenant_served_least_goes_first_then_arrival_order() -> None:
    q = FairQueue()
    for name in ("flood", "flood", "flood", "light"):
        q.push(waiter(name))
    q.charge("flood", 100, 1.0)
    assert order(q) == ["light", "flood", "flood", "flood"]


def test_counters_divide_tokens_by_weight() -> None:
    q = FairQueue()
    q.push(waiter("a"))
    q.push(waiter("b"))
    q.charge("a", 100, 1.0)
    q.charge("b", 300, 4.0)  # 75 virtual tokens: less than a's 100
    assert q.served("b") == 75.0
    assert q.pop().tenant == "b"  # type: ignore[union-attr]


def test_higher_lanes_go_first_whatever_the_counters() -> None:
    q = FairQueue()
    q.push(waiter("light", lane=0))
    q.push(waiter("vip", lane=5))
    q.push(waiter("batch", lane=-1))
    q.charge("vip", 10_000, 1.0)
    assert order(q) == ["vip", "light", "batch"]


def test_an_idle_tenant_is_lifted_to_the_lowest_waiting_counter_and_banks_no_credit() -> None:
    q = FairQueue()
    q.push(waiter("flood"))
    q.charge("flood", 500, 1.0)
    q.push(waiter("light"))  # never served: would be 0 and win for 500 tokens without the lift
    assert q.served("light") == 500.0
    q.push(waiter("light"))  # already waiting: no second lift
    q.charge("light", 10, 1.0)
    assert q.served("light") == 510.0


def test_with_no_one_waiting_a_returning_tenant_starts_at_the_last_served_counter() -> None:
    q = FairQueue()
    q.push(waiter("a"))
    q.charge("a", 300, 1.0)
    assert q.pop() is not None
    q.push(waiter("b"))
    assert q.served("b") == 300.0


def test_ties_go_to_the_tenant_with_fewer_running_then_fewer_waiting() -> None:
    q = FairQueue()
    q.started("busy")
    q.started("busy")
    q.push(waiter("busy"))
    q.push(waiter("quiet"))
    assert q.served("busy") == q.served("quiet")
    assert q.pop().tenant == "quiet"  # type: ignore[union-attr]
    q = FairQueue()
    for name in ("flood", "flood", "flood", "light"):
        q.push(waiter(name))
    assert order(q)[0] == "light"


def test_remove_takes_a_waiter_out_and_ahead_counts_who_goes_first() -> None:
    q = FairQueue()
    first, second = waiter("a"), waiter("a")
    vip = waiter("v", lane=1)
    for w in (first, second, vip):
        q.push(w)
    assert q.ahead(second) == 2  # the higher lane and its own tenant's earlier one
    q.remove(first)
    q.remove(first)  # twice is harmless
    assert (len(q), q.waiting("a"), q.ahead(second)) == (2, 1, 1)
    assert order(q) == ["v", "a"]


# --- room --------------------------------------------------------------------------------------


def report(capacity: int, queued: int = 0, running: int = 0) -> LoadReport:
    return LoadReport(
        replica_id="r",
        state=ReplicaState.READY,
        model="m",
        queued=queued,
        running=running,
        capacity=capacity,
    )


def test_room_is_capacity_plus_replica_queue_minus_every_routers_requests() -> None:
    registry = Registry(stale_after_s=10.0)
    r = registry.add("a:1")
    registry.update(r, report(capacity=4, running=3))  # 3 from other routers
    assert room(r, replica_queue=0) == 1
    assert room(r, replica_queue=2) == 3
    r.inflight = 2  # this router's own (the report's 3 then count as ours first)
    registry.update(r, report(capacity=4, running=3))
    assert (r.others_requests, room(r, 0)) == (1, 1)
    registry.update(r, report(capacity=0))
    assert room(r, 0) == UNBOUNDED  # an engine that does not say is never saturated
    assert total_room([r, r], 0) == UNBOUNDED


# --- the gate ----------------------------------------------------------------------------------


def tenant(name: str, **settings: object) -> Tenant:
    return Tenant(name=name, role=Role.USER, limits=TenantLimits(), **settings)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Mesh:
    """One replica of model ``m`` with ``capacity`` slots, and its admission queue."""

    def __init__(self, capacity: int, **config: object) -> None:
        self.clock = Clock()
        self.registry = Registry(stale_after_s=1e9, clock=self.clock)
        self.replica: Replica = self.registry.add("a:1")
        self.registry.update(self.replica, report(capacity=capacity))
        self.metrics = QueueMetrics(CollectorRegistry())
        self.gate = AdmissionQueue(
            self.registry,
            QueueConfig(**config),  # type: ignore[arg-type]
            self.metrics,
            retry_after_s=1.0,
            clock=self.clock,
        )
        self._leases = contextlib.ExitStack()

    async def admit(self, who: Tenant, priority: int = 0, deadline: float | None = None) -> Ticket:
        return await self.gate.admit(
            "m", who, priority=priority, estimate=10, time_remaining=lambda: deadline
        )

    def run(self, ticket: Ticket) -> None:
        """The request reaches the replica and holds a slot there."""
        self._leases.enter_context(self.registry.lease(self.replica, 100))
        ticket.on_replica()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_requests_go_at_once_while_there_is_room_then_wait_and_get_freed_slots() -> None:
    mesh = Mesh(capacity=1)
    a = tenant("a")
    first = await mesh.admit(a)
    mesh.run(first)
    second = asyncio.create_task(mesh.admit(a))
    await settle()
    assert not second.done() and len(mesh.gate.models["m"].queue) == 1
    mesh.replica.inflight -= 1  # the first request's lease ends...
    first.close()  # ...and its ticket: the slot goes to the waiter
    await settle()
    assert second.done() and second.result().waited_s >= 0.0


async def test_a_freed_slot_goes_to_the_light_tenant_not_the_flood() -> None:
    mesh = Mesh(capacity=1)
    flood, light = tenant("flood"), tenant("light")
    running = await mesh.admit(flood)
    mesh.run(running)
    running.served(1_000)
    floods = [asyncio.create_task(mesh.admit(flood)) for _ in range(5)]
    await settle()
    light_task = asyncio.create_task(mesh.admit(light))
    await settle()
    mesh.replica.inflight -= 1
    running.close()
    await settle()
    assert light_task.done() and not any(t.done() for t in floods)
    for t in floods:
        t.cancel()
    await settle()
    assert len(mesh.gate.models["m"].queue) == 0


async def test_sheddable_requests_are_refused_when_saturated_never_queued() -> None:
    mesh = Mesh(capacity=1)
    a = tenant("a")
    (await mesh.admit(a, priority=-1)).close()  # room: it goes
    mesh.run(await mesh.admit(a))
    with pytest.raises(ResourceExhausted) as e:
        await mesh.admit(a, priority=-1)
    assert e.value.reason == "SHED" and e.value.retry_after == 1.0
    assert len(mesh.gate.models["m"].queue) == 0
    sample = mesh.metrics.refusals.labels("m", "a", "SHED")._value.get()
    assert sample == 1


async def test_a_tenants_queue_is_bounded_by_its_own_max_queued_else_the_routers() -> None:
    mesh = Mesh(capacity=1, max_queued=3)
    mesh.run(await mesh.admit(tenant("x")))
    small = tenant("small", max_queued=1)
    waiting = [asyncio.create_task(mesh.admit(small))]
    await settle()
    with pytest.raises(ResourceExhausted) as e:
        await mesh.admit(small)
    assert e.value.reason == "QUEUE_FULL" and "max_queued" in e.value.message
    others = [asyncio.create_task(mesh.admit(tenant("big"))) for _ in range(3)]
    await settle()
    with pytest.raises(ResourceExhausted):
        await mesh.admit(tenant("big"))
    for t in waiting + others:
        t.cancel()
    await settle()


async def test_a_request_that_waits_past_max_wait_is_refused_with_retry_info() -> None:
    mesh = Mesh(capacity=1)
    mesh.run(await mesh.admit(tenant("x")))
    with pytest.raises(ResourceExhausted) as e:
        await mesh.admit(tenant("impatient", max_queue_wait_s=0.05))
    assert e.value.reason == "QUEUE_WAIT_EXCEEDED" and e.value.retry_after is not None
    assert len(mesh.gate.models["m"].queue) == 0


async def test_a_deadline_the_queue_cannot_meet_is_refused_at_once() -> None:
    mesh = Mesh(capacity=1)
    a = tenant("a")
    for _ in range(5):  # five slots freed within one second: about 5 a second
        ticket = await mesh.admit(a)
        ticket.close()
        mesh.clock.now += 0.2
    mesh.run(await mesh.admit(a))
    queued = [asyncio.create_task(mesh.admit(a)) for _ in range(10)]  # ~2 s of waiting
    await settle()
    with pytest.raises(DeadlineExceeded) as e:
        await mesh.admit(a, deadline=0.5)
    assert e.value.reason == "QUEUE_WAIT_EXCEEDS_DEADLINE"
    assert float(e.value.metadata["expected_wait_s"]) > 0.5
    assert len(mesh.gate.models["m"].queue) == 10  # it left nothing behind
    vip = asyncio.create_task(mesh.admit(a, priority=1, deadline=0.5))  # nobody ahead: waits
    await settle()
    assert not vip.done()
    for t in [*queued, vip]:
        t.cancel()
    await settle()


async def test_cancelling_a_waiter_frees_its_place_and_a_granted_slot_is_given_back() -> None:
    mesh = Mesh(capacity=1)
    a = tenant("a")
    first = await mesh.admit(a)
    mesh.run(first)
    gone = asyncio.create_task(mesh.admit(a))
    await settle()
    gone.cancel()
    await settle()
    m = mesh.gate.models["m"]
    assert (len(m.queue), m.granted) == (0, {})
    # A slot granted to a request that reached no replica (its caller gave up) is free again.
    mesh.replica.inflight -= 1
    first.close()
    ticket = await mesh.admit(a)
    ticket.close()
    assert m.pending == 0
    again = await mesh.admit(a)
    assert again.waited_s == 0.0


async def test_with_the_queue_off_or_no_replica_nothing_waits() -> None:
    mesh = Mesh(capacity=1, enabled=False)
    mesh.run(await mesh.admit(tenant("a")))
    assert (await mesh.admit(tenant("a"))).waited_s == 0.0
    other = Mesh(capacity=1)
    ticket = await other.gate.admit(
        "unknown", tenant("a"), priority=0, estimate=1, time_remaining=lambda: None
    )
    assert "unknown" not in other.gate.models
    ticket.close()


async def test_the_prompt_estimate_is_charged_at_once_and_corrected_by_the_real_count() -> None:
    mesh = Mesh(capacity=4)
    a = tenant("a", weight=2.0)
    ticket = await mesh.admit(a)  # estimate 10 -> 5 virtual tokens
    q = mesh.gate.models["m"].queue
    assert q.served("a") == 5.0
    ticket.served(20)
    ticket.prompt_tokens = 14
    ticket.close()
    assert q.served("a") == (14 + 20) / 2.0


def test_the_fair_share_counts_tenants_and_requests_on_other_routers() -> None:

    m = ModelQueue()
    flood = tenant("flood")
    m.seen(flood, now=0.0)
    for _ in range(6):
        m.queue.started("flood")
    assert "flood" in m.under_share(slots=16, now=0.0)  # alone: its share is every slot
    m.elsewhere = {"light": (1.0, 2)}  # active on another router
    assert m.under_share(slots=16, now=0.0) == {"flood", "light"}  # 6 < 16 / 2
    m.elsewhere = {"light": (1.0, 2), "flood": (1.0, 3)}  # 3 more of its own elsewhere
    assert m.under_share(slots=16, now=0.0) == {"light"}  # 9 >= 8
    m.elsewhere = {"light": (3.0, 0)}
    assert "flood" not in m.under_share(slots=16, now=0.0)  # 6 >= 16 x 1/4


async def test_the_reserve_keeps_slots_for_a_tenant_under_its_share() -> None:
    mesh = Mesh(capacity=8, reserve=0.25)  # 2 of the 8 slots kept
    flood, light = tenant("flood"), tenant("light")
    running = [await mesh.admit(flood) for _ in range(8)]  # alone: every slot is its share
    for ticket in running:
        mesh.run(ticket)
        ticket.served(100)
    waiting_flood = asyncio.create_task(mesh.admit(flood))
    waiting_light = asyncio.create_task(mesh.admit(light))
    await settle()
    assert not waiting_flood.done() and not waiting_light.done()

    def end(ticket: Ticket) -> None:
        mesh.replica.inflight -= 1
        ticket.close()

    end(running.pop())
    await settle()
    assert waiting_light.done() and not waiting_flood.done()  # light first: served least
    mesh.run(waiting_light.result())
    end(running.pop())  # one slot free, but the reserve keeps 2 - light's 1 running
    await settle()
    assert not waiting_flood.done()
    end(running.pop())  # two free: one beyond what the reserve keeps
    await settle()
    assert waiting_flood.done()
    # Light, under its share (1 of 4), goes at once into a free slot even past a waiter.
    more = asyncio.create_task(mesh.admit(flood))
    await settle()
    end(running.pop())
    assert (await mesh.admit(light)).waited_s == 0.0
    more.cancel()
    await settle()
