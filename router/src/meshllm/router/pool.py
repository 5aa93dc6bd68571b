"""Connections to replicas: one typed client each, and a task that follows its load reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshllm.api.errors import MeshError
from meshllm.api.tls import ChannelTLS
from meshllm.api.types import LoadReport
from meshllm.router.config import DiscoveryConfig
from meshllm.router.registry import Registry, Replica, ServedModel
from meshllm.router.replica_client import ReplicaClient

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LinkSettings:
    """What each link needs: how to follow reports, how to connect, how long to let work end."""

    discovery: DiscoveryConfig
    tls: ChannelTLS | None
    max_message_bytes: int
    drain_grace_s: float
    """How long requests on a replica that discovery removed may still finish."""


class ReplicaLink:
    """The client of one replica and the task that keeps its registry entry current."""

    def __init__(self, replica: Replica, settings: LinkSettings, registry: Registry) -> None:
        self.replica = replica
        self.client = ReplicaClient(replica.address, settings.tls, settings.max_message_bytes)
        self._discovery, self._registry = settings.discovery, registry
        self._task: asyncio.Task[None] | None = None
        self._reports = 0
        self._closing = False

    def start(self, on_change: Callable[[], None]) -> None:
        self._task = asyncio.create_task(
            self._follow(on_change), name=f"watch {self.replica.address}"
        )

    async def _follow(self, on_change: Callable[[], None]) -> None:
        backoff, told = 0.1, set[str]()  # why the replica could not be reached, as logged
        loop = asyncio.get_running_loop()
        reachable_at = loop.time()  # a replica still starting (as under `meshllm up`) is no news
        while not self._closing:
            reports_before = self._reports
            self.replica.last_error = await self._watch(on_change)
            self._registry.changes.notify()
            if self.replica.connected:
                log.warning("replica %s ejected: %s", self.replica.name, self.replica.last_error)
                self._registry.eject(self.replica, self.replica.last_error)
                on_change()
            elif (
                self.replica.last_error not in told  # once per cause: an address, TLS settings
                and loop.time() - reachable_at >= self._discovery.stale_after_s
            ):
                told.add(self.replica.last_error)
                log.warning(
                    "replica %s unreachable: %s", self.replica.address, self.replica.last_error
                )
            if self._reports != reports_before:
                backoff, reachable_at = 0.1, loop.time()
                told.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._discovery.reconnect_max_s)

    async def _watch(self, on_change: Callable[[], None]) -> str:
        """Follow the report stream until it ends; returns why it did."""
        d = self._discovery
        try:
            # A replica that stops reporting without closing the stream is stale after
            # stale_after_s: the read timeout turns that silence into a reconnect.
            async for report in self.client.watch_load(d.report_interval_ms, d.stale_after_s):
                if self._closing:
                    break
                self._reports += 1
                await self._apply(report, on_change)
        except TimeoutError:
            return f"no load report for {d.stale_after_s:.1f}s"
        except MeshError as e:
            return f"{e.code.name}: {e.message}"
        return self.replica.last_error or "load-report stream ended"

    async def _apply(self, report: LoadReport, on_change: Callable[[], None]) -> None:
        replica = self.replica
        before = (replica.connected, replica.state, replica.report.model if replica.report else "")
        if report.model and (replica.served is None or replica.served.id != report.model):
            await self._refresh_model()
        elif not report.model:
            replica.served = None
        self._registry.update(replica, report)
        if before != (True, report.state, report.model):
            log.info(
                "replica %s at %s: %s %s",
                report.replica_id,
                replica.address,
                report.state.value,
                report.model or "(no model)",
            )
            on_change()

    async def _refresh_model(self) -> None:
        timeout = self._discovery.stale_after_s
        status = await self.client.status(timeout=timeout)
        models = await self.client.models(timeout=timeout)
        spec = status.spec
        self.replica.served = next(
            (ServedModel(spec, m) for m in models if spec is not None and m.id == spec.id), None
        )

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop watching; close the channel once this router's requests there ended (or grace)."""
        # The flag, not just cancel(): a cancel that races a finishing read can be lost.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._registry.changes.wait_for(lambda: not self.replica.inflight, grace_s)
        await self.client.close()


class ReplicaPool:
    """The set of replica links, kept equal to what discovery lists."""

    def __init__(
        self, settings: LinkSettings, registry: Registry, on_change: Callable[[], None]
    ) -> None:
        self._settings, self._registry, self._on_change = settings, registry, on_change
        self.links: dict[str, ReplicaLink] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def sync(self, addresses: Iterable[str]) -> None:
        wanted = set(addresses)
        for address in sorted(wanted - set(self.links)):
            replica = self._registry.add(address)
            link = self.links[address] = ReplicaLink(replica, self._settings, self._registry)
            link.start(self._on_change)
            log.info("replica %s added", address)
        for address in sorted(set(self.links) - wanted):
            link = self.links.pop(address)
            self._registry.remove(address)
            log.info("replica %s removed; in-flight requests there may finish", address)
            task = asyncio.create_task(link.close(self._settings.drain_grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._on_change()

    def link(self, replica: Replica) -> ReplicaLink | None:
        link = self.links.get(replica.address)
        return link if link is not None and link.replica is replica else None

    def client(self, replica: Replica) -> ReplicaClient | None:
        """The replica's client while discovery lists it (None once it was removed)."""
        link = self.link(replica)
        return link.client if link is not None else None

    async def close(self) -> None:
        links, self.links = list(self.links.values()), {}
        await asyncio.gather(*(link.close() for link in links), *self._closing)
