"""Carrying out placement: keep catalog models on their desired number of replicas, and the admin
operations (load, unload, scale, drain) that change it.

What runs where is never stored here: it is read back from the replicas' reports, so a restarted
router rebuilds it without loading anything. This router's own state is the desired count per
model (from the catalog, changed by load/unload/scale) and the loads it has under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from meshllm.api.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    from_rpc_error,
)
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.router.config import RouterConfig
from meshllm.router.convert import replica_status_to_pb, spec_to_pb, state_from_pb
from meshllm.router.placement import plan
from meshllm.router.placement.catalog import CatalogModel
from meshllm.router.placement.desired import DesiredCounts, LocalCounts, current
from meshllm.router.pool import ReplicaPool, removal_as_error
from meshllm.router.registry import Registry, Replica

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    at: float
    reason: str


@dataclass(frozen=True)
class Load:
    model: str
    task: asyncio.Task[str]
    """Ends with "" (loaded, or still loading after load_timeout_s) or why the load failed."""


class Placement:
    """The reconcile loop (start/close) and the admin operations on models and replicas."""

    def __init__(self, config: RouterConfig, registry: Registry, pool: ReplicaPool,
                 counts: DesiredCounts | None = None, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._config, self._registry, self._pool, self._clock = config, registry, pool, clock
        self.catalog: dict[str, CatalogModel] = {m.id: m for m in config.models}
        self.desired = {m.id: m.desired_replicas for m in config.models}
        """Replicas wanted per catalog model: the catalog's, as load/unload/scale changed it
        (through any router sharing ``counts``)."""
        self._counts = counts or LocalCounts()
        self.failures: dict[str, Failure] = {}
        """The last failed load of a model, until one succeeds (automatic placement waits
        ``load_retry_s`` after it)."""
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._loads: dict[Replica, Load] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the reconcile loop --------------------------------------------------------------------

    def start(self) -> None:
        if self.catalog:
            self._task = asyncio.create_task(self._run(), name="placement")

    def changed(self) -> None:
        """A replica changed state (or appeared): look again at what is missing."""
        self._wake.set()

    async def _run(self) -> None:
        await self._settle()
        while True:
            self._wake.clear()
            self.desired.update(current(self.catalog, await self._counts.read()))
            self.reconcile()
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel that arrives as
            # the wake fires, and close() would then wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.refresh_s):
                    await self._wake.wait()

    async def _settle(self) -> None:
        """Before the first placement, hear from every replica (or give up on the silent ones
        after ``stale_after_s``): a replica that already hosts a model must be counted, or a
        restarted router would load it a second time elsewhere."""
        deadline = self._clock() + self._config.stale_after_s
        while self._clock() < deadline and any(  # noqa: ASYNC110 (no event says "unreachable")
            r.report is None and not r.last_error for r in self._registry.replicas.values()
        ):
            await asyncio.sleep(0.02)

    def reconcile(self) -> None:
        """Start loads that bring catalog models up to their desired count on idle replicas.
        Never unloads anything: only an admin operation does that."""
        now = self._clock()
        for entry in self.catalog.values():
            if self._locks[entry.id].locked() or self._backing_off(entry.id, now):
                continue  # an admin operation on this model decides for now
            for replica in plan.to_load(self._registry.replicas.values(), entry,
                                        self.desired[entry.id], now, self._config.stale_after_s):  # fmt: skip
                self._start_load(replica, entry)

    def _backing_off(self, model: str, now: float) -> bool:
        failure = self.failures.get(model)
        return failure is not None and now - failure.at < self._config.load_retry_s

    async def close(self) -> None:
        tasks = [t for t in (self._task, *(load.task for load in self._loads.values())) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._counts.close()

    async def _want(self, model: str, count: int) -> None:
        """Set a catalog model's desired count, here and for every router sharing the counts."""
        self.desired[model] = count
        await self._counts.write(model, count, self.catalog[model].desired_replicas)

    # -- loading and unloading one replica -------------------------------------------------------

    def _start_load(self, replica: Replica, entry: CatalogModel) -> asyncio.Task[str]:
        replica.claim = entry.id
        task = asyncio.create_task(
            self._load_on(replica, entry), name=f"load {entry.id} on {replica.name}"
        )
        self._loads[replica] = Load(entry.id, task)
        task.add_done_callback(lambda _: self._loads.pop(replica, None))
        log.info("loading %s on replica %s", entry.id, replica.name)
        return task

    async def _load_on(self, replica: Replica, entry: CatalogModel) -> str:
        link = self._pool.link(replica)
        if link is None:  # discovery removed it since it was chosen (and woke the loop then)
            replica.claim = ""
            return f"{replica.name}: the replica was removed"
        try:
            request = rc.LoadModelRequest(spec=spec_to_pb(entry), wait=True)
            status = await removal_as_error(
                link.control.LoadModel(request, timeout=self._config.load_timeout_s)
            )
            await self._reported(replica, status)
            error = status.error if status.state == rc.REPLICA_STATE_FAILED else ""
        except grpc.aio.AioRpcError as e:
            replica.claim = ""
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                log.warning("%s still loading on %s after %.0fs; no longer waiting", entry.id,
                            replica.name, self._config.load_timeout_s)  # fmt: skip
                return ""
            error = f"{e.code().name}: {e.details()}"
            if self._pool.link(replica) is not link:  # removed while loading: not the model's fault
                log.info("replica %s was removed while loading %s", replica.name, entry.id)
                return f"{replica.name}: {error}"
            if from_rpc_error(e).reason == "REPLICA_BUSY":  # another router placed something there
                log.info("replica %s was taken meanwhile: %s", replica.name, e.details())
                self.changed()
                return f"{replica.name}: {error}"
        if error:
            replica.claim, error = "", f"{replica.name}: {error}"
            self.failures[entry.id] = Failure(self._clock(), error)
            log.error("loading %s failed: %s", entry.id, error)
        else:
            self.failures.pop(entry.id, None)
        self.changed()
        return error

    async def _unload_on(self, replica: Replica, model: str, drain_s: float) -> str:
        """Drain then free ``model`` on one replica; "" when done (or nothing was there)."""
        link = self._pool.link(replica)
        if link is None:
            return ""
        request = rc.UnloadModelRequest(drain_timeout_s=drain_s, model=model)
        try:
            # The replica finishes a load under way before it drains and frees it.
            status = await removal_as_error(
                link.control.UnloadModel(request, timeout=drain_s + self._config.load_timeout_s)
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return ""  # the model was gone already
            return f"{replica.name}: {e.code().name}: {e.details()}"
        await self._reported(replica, status)
        log.info("unloaded %s from replica %s", model, replica.name)
        return ""

    async def _reported(self, replica: Replica, status: rc.ReplicaStatus) -> None:
        """Wait (up to ``stale_after_s``) until the replica's reports show the state it just
        answered with: its reports come in order, but not in order with its answers, so acting
        on an answer directly could be undone by an older report still on its way."""
        state, deadline = state_from_pb(status.state), self._clock() + self._config.stale_after_s
        while replica.connected and replica.state != state and self._clock() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    # -- admin operations ----------------------------------------------------------------------

    def entry(self, model: str) -> CatalogModel:
        entry = self.catalog.get(model)
        if entry is None:
            known = ", ".join(sorted(self.catalog)) or "none"
            raise NotFound(f"model {model!r} is not in the catalog (catalog: {known})")
        return entry

    def _check_limit(self, entry: CatalogModel, replicas: int) -> None:
        if not entry.within_limit(replicas):
            raise InvalidArgument(
                f"replicas: {replicas} is above the catalog's max_replicas {entry.max_replicas} "
                f"for {entry.id!r}", field_violations=[FieldViolation("replicas", f"at most {entry.max_replicas}")],
            )  # fmt: skip

    async def load(self, model: str, replicas: int, overrides: Mapping[str, Any], *, wait: bool) -> None:  # fmt: skip
        """Put ``model`` on at least ``replicas`` replicas (0: its desired count, at least 1)."""
        entry = self.entry(model).with_overrides(overrides)
        want = replicas or max(entry.desired_replicas, 1)
        self._check_limit(entry, want)
        async with self._locks[model]:
            before = self.desired[model]
            await self._want(model, max(before, want))
            self.failures.pop(model, None)
            try:
                await self._grow(entry, want, wait=wait)
            except FailedPrecondition:
                await self._want(model, before)  # nothing changed: no retrying in the background
                raise

    async def scale(self, model: str, replicas: int, drain_s: float, *, wait: bool) -> None:
        """Make ``replicas`` replicas host ``model``: load on idle ones, or drain and free some."""
        entry = self.entry(model)
        self._check_limit(entry, replicas)
        async with self._locks[model]:
            await self._want(model, replicas)
            held = plan.hosting(self._registry.replicas.values(), model)
            if replicas > len(held):
                self.failures.pop(model, None)
                await self._grow(entry, replicas, wait=wait)
            else:
                victims = plan.to_unload(held, model, replicas)
                await self._shrink(victims, model, drain_s)

    async def unload(self, model: str, drain_s: float) -> None:
        """Drain and free ``model`` everywhere; it stays unplaced until loaded again."""
        held = plan.hosting(self._registry.replicas.values(), model)
        if model not in self.catalog and not held:
            raise NotFound(f"model {model!r} is neither in the catalog nor loaded on a replica")
        async with self._locks[model]:
            if model in self.catalog:
                await self._want(model, 0)
            await self._shrink(
                plan.hosting(self._registry.replicas.values(), model), model, drain_s
            )

    async def _grow(self, entry: CatalogModel, want: int, *, wait: bool) -> None:
        """Start loads up to ``want``; with ``wait``, wait for those of this model under way
        (FailedPrecondition when every load this call started failed, with the reasons)."""
        replicas = self._registry.replicas.values()
        chosen = plan.to_load(replicas, entry, want, self._clock(), self._config.stale_after_s)
        started = [self._start_load(r, entry) for r in chosen]
        if not wait:
            return
        others = [load.task for load in self._loads.values() if load.model == entry.id]
        errors = await asyncio.gather(*started)
        await asyncio.gather(*(t for t in others if t not in started))
        if started and all(errors):
            raise FailedPrecondition(
                f"loading {entry.id!r} failed: " + "; ".join(errors),
                reason="MODEL_LOAD_FAILED", metadata={"model": entry.id},
            )  # fmt: skip

    async def _shrink(self, victims: list[Replica], model: str, drain_s: float) -> None:
        drain_s = drain_s or self._config.unload_drain_s
        for replica in victims:
            replica.leaving = True  # no new work from this router, before the replica says so
        try:
            errors = await asyncio.gather(*(self._unload_on(r, model, drain_s) for r in victims))
        finally:
            for replica in victims:
                replica.leaving = False
        if failed := [e for e in errors if e]:
            raise Unavailable(f"unloading {model!r} failed: " + "; ".join(failed),
                              reason="UNLOAD_FAILED", metadata={"model": model})  # fmt: skip

    async def drain(self, name: str, *, undrain: bool = False) -> rc.ReplicaStatus:
        """Stop (or restart) new work on one replica; it keeps its model."""
        replica = self._registry.find(name)
        link = self._pool.link(replica) if replica is not None else None
        if replica is None or link is None:
            names = ", ".join(sorted(r.name for r in self._registry.replicas.values()))
            raise NotFound(f"no replica {name!r} (replicas: {names or 'none'})")
        timeout = self._config.stale_after_s
        try:
            status: rc.ReplicaStatus = await removal_as_error(
                link.control.Undrain(rc.UndrainRequest(), timeout=timeout) if undrain
                else link.control.Drain(rc.DrainRequest(), timeout=timeout)
            )  # fmt: skip
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
        await self._reported(replica, status)
        return status

    # -- reading ---------------------------------------------------------------------------------

    async def statuses(self) -> list[rc.ReplicaStatus]:
        """Every replica's own status (model spec, error, device memory), or the router's view
        of it where the replica does not answer."""
        replicas = sorted(self._registry.replicas.values(), key=lambda r: r.name)
        return list(await asyncio.gather(*(self._status(r) for r in replicas)))

    async def _status(self, replica: Replica) -> rc.ReplicaStatus:
        link = self._pool.link(replica)
        if link is not None and replica.connected:
            with contextlib.suppress(grpc.aio.AioRpcError):
                status: rc.ReplicaStatus = await removal_as_error(
                    link.control.GetStatus(
                        rc.GetStatusRequest(), timeout=self._config.stale_after_s
                    )
                )
                if replica.leaving and status.state == rc.REPLICA_STATE_READY:
                    status.state = rc.REPLICA_STATE_DRAINING  # being unloaded by this router
                return status
        return replica_status_to_pb(replica)

    def pending(self, model: str) -> str:
        entry = self.catalog.get(model)
        if entry is None:
            return ""
        failure = self.failures.get(model)
        return plan.pending(self._registry.replicas.values(), entry, self.desired[model],
                            self._clock(), self._config.stale_after_s,
                            failure=failure.reason if failure else "")  # fmt: skip
