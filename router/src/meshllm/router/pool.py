"""Connections to replicas: one channel each, and a task that follows its load reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import grpc

from meshllm.api.tls import channel
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.api.v1 import replica_control_pb2_grpc as rc_grpc
from meshllm.router.config import RouterConfig
from meshllm.router.convert import report_from_pb, served_from_pb
from meshllm.router.registry import LoadReport, Registry, Replica

log = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly to a replica that restarts; the watcher backs off on its own.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


async def removal_as_error(call: Awaitable[T]) -> T:
    """Await a call on a link's channel. Closing the channel (discovery removed the replica)
    ends its calls with ``asyncio.CancelledError``, which would also end the task awaiting
    them, an admin call included: here it is an ``AioRpcError`` CANCELLED like any failed
    call. A cancel of the awaiting task itself still propagates."""
    try:
        return await call
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), "the replica was removed") from None  # fmt: skip


class ReplicaLink:
    """The channel to one replica, its stubs, and the task that keeps its registry entry current."""

    def __init__(self, replica: Replica, config: RouterConfig, registry: Registry) -> None:
        self.replica = replica
        opts = [*CHANNEL_OPTIONS, ("grpc.max_receive_message_length", config.max_message_bytes)]
        self.channel = channel(replica.address, config.replica_tls, opts)
        self.generation = gen_grpc.GenerationStub(self.channel)
        self.control = rc_grpc.ReplicaControlStub(self.channel)
        self._config, self._registry = config, registry
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
            try:
                await self._watch(on_change)
                self.replica.last_error = self.replica.last_error or "load-report stream ended"
            except grpc.aio.AioRpcError as e:
                self.replica.last_error = f"{e.code().name}: {e.details()}"
            if self.replica.connected:
                log.warning("replica %s ejected: %s", self.replica.name, self.replica.last_error)
                self.replica.eject(self.replica.last_error)
                on_change()
            elif (self.replica.last_error not in told  # once per cause: an address, TLS settings
                  and loop.time() - reachable_at >= self._config.stale_after_s):  # fmt: skip
                told.add(self.replica.last_error)
                log.warning(
                    "replica %s unreachable: %s", self.replica.address, self.replica.last_error
                )
            if self._reports != reports_before:
                backoff, reachable_at = 0.1, loop.time()
                told.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._config.reconnect_max_s)

    async def _watch(self, on_change: Callable[[], None]) -> None:
        request = rc.WatchLoadRequest(interval_ms=self._config.report_interval_ms)
        # A replica that stops reporting without closing the stream is stale after stale_after_s;
        # the read timeout turns that silence into a reconnect.
        call = self.control.WatchLoad(request)
        try:
            while not self._closing:
                async with asyncio.timeout(self._config.stale_after_s):
                    msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                self._reports += 1
                await self._apply(report_from_pb(msg), on_change)
        except TimeoutError:
            self.replica.last_error = f"no load report for {self._config.stale_after_s:.1f}s"
        finally:
            call.cancel()

    async def _apply(self, report: LoadReport, on_change: Callable[[], None]) -> None:
        replica = self.replica
        before = (replica.connected, replica.state, replica.report.model if replica.report else "")
        if report.model and (replica.served is None or replica.served.id != report.model):
            await self._refresh_model()
        elif not report.model:
            replica.served = None
        self._registry.update(replica, report)
        if before != (True, report.state, report.model):
            log.info("replica %s at %s: %s %s", report.replica_id, replica.address,
                     report.state.value, report.model or "(no model)")  # fmt: skip
            on_change()

    async def _refresh_model(self) -> None:
        timeout = self._config.stale_after_s
        status = await self.control.GetStatus(rc.GetStatusRequest(), timeout=timeout)
        models = await self.generation.ListModels(gen.ListModelsRequest(), timeout=timeout)
        self.replica.served = next(
            (served_from_pb(m, status) for m in models.models if m.id == status.spec.id), None
        )

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop watching; close the channel once this router's requests there ended (or grace)."""
        # The flag, not just cancel(): a cancel that races a finishing read can be lost.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        deadline = asyncio.get_running_loop().time() + grace_s
        # Polling: leases end in request handlers that know nothing about this link.
        while self.replica.inflight and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await self.channel.close()


class ReplicaPool:
    """The set of replica links, kept equal to what discovery lists."""

    def __init__(
        self, config: RouterConfig, registry: Registry, on_change: Callable[[], None]
    ) -> None:
        self._config, self._registry, self._on_change = config, registry, on_change
        self.links: dict[str, ReplicaLink] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def sync(self, addresses: Iterable[str]) -> None:
        wanted = set(addresses)
        for address in sorted(wanted - set(self.links)):
            link = self.links[address] = ReplicaLink(self._registry.add(address), self._config,
                                                     self._registry)  # fmt: skip
            link.start(self._on_change)
            log.info("replica %s added", address)
        for address in sorted(set(self.links) - wanted):
            link = self.links.pop(address)
            self._registry.remove(address)
            log.info("replica %s removed; in-flight requests there may finish", address)
            task = asyncio.create_task(link.close(self._config.drain_grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._on_change()

    def link(self, replica: Replica) -> ReplicaLink | None:
        link = self.links.get(replica.address)
        return link if link is not None and link.replica is replica else None

    async def close(self) -> None:
        links, self.links = list(self.links.values()), {}
        await asyncio.gather(*(link.close() for link in links), *self._closing)
