"""Carrying out placement: keep catalog models on their desired number of replicas, and the admin
operations (load, unload, scale, drain) that change it.

What runs where is never stored here: it is read back from the replicas' reports, so a restarted
router rebuilds it without loading anything. This router's own state is the desired count per
model (from the catalog, changed by load/unload/scale) and the loads it has under way.
Domain types only: replicas are reached through a ``Clients`` (the pool, or a test double).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

from meshllm.api.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from meshllm.api.types import ReplicaStatus
from meshllm.router.config import PlacementConfig
from meshllm.router.placement import plan
from meshllm.router.placement.catalog import CatalogModel
from meshllm.router.placement.desired import DesiredCounts, LocalCounts, current
from meshllm.router.placement.loads import Clients, Loads
from meshllm.router.placement.overview import Overview
from meshllm.router.registry import Registry, Replica


class Placement:
    """The reconcile loop (start/close) and the admin operations on models and replicas."""

    def __init__(
        self,
        config: PlacementConfig,
        catalog: tuple[CatalogModel, ...],
        registry: Registry,
        clients: Clients,
        counts: DesiredCounts | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config, self._registry, self._clients, self._clock = config, registry, clients, clock
        self.catalog: dict[str, CatalogModel] = {m.id: m for m in catalog}
        self.desired = {m.id: m.desired_replicas for m in catalog}
        """Replicas wanted per catalog model: the catalog's, as load/unload/scale changed it
        (through any router sharing ``counts``)."""
        self._counts = counts or LocalCounts()
        self.loads = Loads(config, registry, clients, self.changed, clock)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.overview = Overview(self, registry, clients)
        """What runs where, for the Admin service."""

    def now(self) -> float:
        return self._clock()

    @property
    def _stale_s(self) -> float:
        return self._registry.stale_after_s

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
        replicas = self._registry.replicas
        await self._registry.changes.wait_for(
            lambda: all(r.report is not None or r.last_error for r in replicas.values()),
            self._stale_s,
        )

    def reconcile(self) -> None:
        """Start loads that bring catalog models up to their desired count on idle replicas.
        Never unloads anything: only an admin operation does that."""
        now = self._clock()
        for entry in self.catalog.values():
            if self._locks[entry.id].locked() or self.loads.backing_off(entry.id):
                continue  # an admin operation on this model decides for now
            for replica in plan.to_load(
                self._registry.replicas.values(), entry, self.desired[entry.id], now, self._stale_s
            ):
                self.loads.start(replica, entry)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.loads.close()
        await self._counts.close()

    async def _want(self, model: str, count: int) -> None:
        """Set a catalog model's desired count, here and for every router sharing the counts."""
        self.desired[model] = count
        await self._counts.write(model, count, self.catalog[model].desired_replicas)

    # -- admin operations on models -------------------------------------------------------------

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
                f"for {entry.id!r}",
                field_violations=[FieldViolation("replicas", f"at most {entry.max_replicas}")],
            )

    async def load(
        self, model: str, replicas: int, overrides: Mapping[str, Any], *, wait: bool
    ) -> None:
        """Put ``model`` on at least ``replicas`` replicas (0: its desired count, at least 1)."""
        entry = self.entry(model).with_overrides(overrides)
        want = replicas or max(entry.desired_replicas, 1)
        self._check_limit(entry, want)
        async with self._locks[model]:
            before = self.desired[model]
            await self._want(model, max(before, want))
            self.loads.failures.pop(model, None)
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
                self.loads.failures.pop(model, None)
                await self._grow(entry, replicas, wait=wait)
            else:
                await self._shrink(plan.to_unload(held, model, replicas), model, drain_s)

    async def unload(self, model: str, drain_s: float) -> None:
        """Drain and free ``model`` everywhere; it stays unplaced until loaded again."""
        held = plan.hosting(self._registry.replicas.values(), model)
        if model not in self.catalog and not held:
            raise NotFound(f"model {model!r} is neither in the catalog nor loaded on a replica")
        async with self._locks[model]:
            if model in self.catalog:
                await self._want(model, 0)
            held = plan.hosting(self._registry.replicas.values(), model)
            await self._shrink(held, model, drain_s)

    async def _grow(self, entry: CatalogModel, want: int, *, wait: bool) -> None:
        """Start loads up to ``want``; with ``wait``, wait for those of this model under way
        (FailedPrecondition when every load this call started failed, with the reasons)."""
        replicas = self._registry.replicas.values()
        chosen = plan.to_load(replicas, entry, want, self._clock(), self._stale_s)
        started = [self.loads.start(r, entry) for r in chosen]
        if not wait:
            return
        others = [t for t in self.loads.of(entry.id) if t not in started]
        errors = await asyncio.gather(*started)
        await asyncio.gather(*others)
        if started and all(errors):
            raise FailedPrecondition(
                f"loading {entry.id!r} failed: " + "; ".join(errors),
                reason="MODEL_LOAD_FAILED",
                metadata={"model": entry.id},
            )

    async def _shrink(self, victims: list[Replica], model: str, drain_s: float) -> None:
        drain_s = drain_s or self._config.unload_drain_s
        for replica in victims:
            replica.leaving = True  # no new work from this router, before the replica says so
        try:
            errors = await asyncio.gather(*(self.loads.unload(r, model, drain_s) for r in victims))
        finally:
            for replica in victims:
                replica.leaving = False
        if failed := [e for e in errors if e]:
            raise Unavailable(
                f"unloading {model!r} failed: " + "; ".join(failed),
                reason="UNLOAD_FAILED",
                metadata={"model": model},
            )

    # -- admin operations on replicas -----------------------------------------------------------

    async def drain(self, name: str, *, undrain: bool = False) -> ReplicaStatus:
        """Stop (or restart) new work on one replica; it keeps its model."""
        replica = self._registry.find(name)
        client = self._clients.client(replica) if replica is not None else None
        if replica is None or client is None:
            names = ", ".join(sorted(r.name for r in self._registry.replicas.values()))
            raise NotFound(f"no replica {name!r} (replicas: {names or 'none'})")
        timeout = self._stale_s
        status = await (client.undrain if undrain else client.drain)(timeout=timeout)
        await self.loads.reported(replica, status.state)
        return status
