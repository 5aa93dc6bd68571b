"""Loading and unloading one model on one replica, and remembering failed loads.

Works on domain types through a replica client (``meshllm.router.replica_client``, or a test
double with the same methods); no protobuf here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from meshllm.api.errors import DeadlineExceeded, MeshError, NotFound
from meshllm.api.spec import ModelSpec
from meshllm.api.types import ReplicaState, ReplicaStatus
from meshllm.router.config import PlacementConfig
from meshllm.router.placement.catalog import CatalogModel
from meshllm.router.registry import Registry, Replica

log = logging.getLogger(__name__)


class ReplicaControl(Protocol):
    """What placement asks of one replica (``ReplicaClient`` in a router)."""

    async def load(self, spec: ModelSpec, *, timeout: float) -> ReplicaStatus: ...

    async def unload(self, model: str, *, drain_s: float, timeout: float) -> ReplicaStatus: ...

    async def drain(self, *, timeout: float) -> ReplicaStatus: ...

    async def undrain(self, *, timeout: float) -> ReplicaStatus: ...

    async def status(self, *, timeout: float) -> ReplicaStatus: ...


class Clients(Protocol):
    def client(self, replica: Replica) -> ReplicaControl | None:
        """The replica's client while discovery lists it, else None."""
        ...


@dataclass(frozen=True)
class Failure:
    at: float
    reason: str


@dataclass(frozen=True)
class Load:
    model: str
    task: asyncio.Task[str]
    """Ends with "" (loaded, or still loading after load_timeout_s) or why the load failed."""


class Loads:
    """The loads under way and the last failed load of each model."""

    def __init__(
        self,
        config: PlacementConfig,
        registry: Registry,
        clients: Clients,
        on_done: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config, self._registry, self._clients = config, registry, clients
        self._on_done, self._clock = on_done, clock
        self.failures: dict[str, Failure] = {}
        """The last failed load of a model, until one succeeds (automatic placement waits
        ``load_retry_s`` after it)."""
        self.running: dict[Replica, Load] = {}

    def backing_off(self, model: str) -> bool:
        failure = self.failures.get(model)
        return failure is not None and self._clock() - failure.at < self._config.load_retry_s

    def of(self, model: str) -> list[asyncio.Task[str]]:
        return [load.task for load in self.running.values() if load.model == model]

    def start(self, replica: Replica, entry: CatalogModel) -> asyncio.Task[str]:
        replica.claim = entry.id
        task = asyncio.create_task(
            self._load(replica, entry), name=f"load {entry.id} on {replica.name}"
        )
        self.running[replica] = Load(entry.id, task)
        task.add_done_callback(lambda _: self.running.pop(replica, None))
        log.info("loading %s on replica %s", entry.id, replica.name)
        return task

    async def _load(self, replica: Replica, entry: CatalogModel) -> str:
        client = self._clients.client(replica)
        if client is None:  # discovery removed it since it was chosen (and woke the loop then)
            replica.claim = ""
            return f"{replica.name}: the replica was removed"
        try:
            status = await client.load(entry.spec, timeout=self._config.load_timeout_s)
        except MeshError as e:
            replica.claim = ""
            return self._not_loaded(replica, entry, client, e)
        await self.reported(replica, status.state)
        if status.state == ReplicaState.FAILED:
            return self._failed(replica, entry, f"{replica.name}: {status.error}")
        self.failures.pop(entry.id, None)
        self._on_done()
        return ""

    def _not_loaded(
        self, replica: Replica, entry: CatalogModel, client: ReplicaControl, e: MeshError
    ) -> str:
        if isinstance(e, DeadlineExceeded):
            log.warning(
                "%s still loading on %s after %.0fs; no longer waiting",
                entry.id,
                replica.name,
                self._config.load_timeout_s,
            )
            return ""
        error = f"{replica.name}: {e.code.name}: {e.message}"
        if self._clients.client(replica) is not client:  # removed: not the model's fault
            log.info("replica %s was removed while loading %s", replica.name, entry.id)
            return error
        if e.reason == "REPLICA_BUSY":  # another router placed something there
            log.info("replica %s was taken meanwhile: %s", replica.name, e.message)
            self._on_done()
            return error
        return self._failed(replica, entry, error)

    def _failed(self, replica: Replica, entry: CatalogModel, error: str) -> str:
        replica.claim = ""
        self.failures[entry.id] = Failure(self._clock(), error)
        log.error("loading %s failed: %s", entry.id, error)
        self._on_done()
        return error

    async def unload(self, replica: Replica, model: str, drain_s: float) -> str:
        """Drain then free ``model`` on one replica; "" when done (or nothing was there)."""
        client = self._clients.client(replica)
        if client is None:
            return ""
        try:
            # The replica finishes a load under way before it drains and frees it.
            timeout = drain_s + self._config.load_timeout_s
            status = await client.unload(model, drain_s=drain_s, timeout=timeout)
        except NotFound:
            return ""  # the model was gone already
        except MeshError as e:
            return f"{replica.name}: {e.code.name}: {e.message}"
        await self.reported(replica, status.state)
        log.info("unloaded %s from replica %s", model, replica.name)
        return ""

    async def reported(self, replica: Replica, state: ReplicaState) -> None:
        """Wait (up to ``stale_after_s``) until the replica's reports show the state it just
        answered with: its reports come in order, but not in order with its answers, so acting
        on an answer directly could be undone by an older report still on its way."""
        await self._registry.changes.wait_for(
            lambda: not replica.connected or replica.state == state, self._registry.stale_after_s
        )

    async def close(self) -> None:
        tasks = [load.task for load in self.running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
