"""What the router knows about each replica, rebuilt from its load reports; no I/O here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from meshllm.api.spec import ModelSpec
from meshllm.api.types import HOSTING, LoadReport, ModelInfo, ReplicaState
from meshllm.router.outliers import Ejection, Outcome, OutlierDetector, OutlierRecord


@dataclass(frozen=True)
class ServedModel:
    """The model a replica serves: its spec (from its status) and its resolved limits (from its
    ListModels)."""

    spec: ModelSpec
    info: ModelInfo

    @property
    def id(self) -> str:
        return self.spec.id


class Changes:
    """Wakes whoever waits for the registry to change (a report, an ejection, a request ending).
    A fresh event per change: a waiter that checks its condition and then waits loses nothing,
    as nothing runs between the two."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` at every change, synchronously (it must not block)."""
        self._listeners.append(listener)

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()
        for listener in self._listeners:
            listener()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until ``predicate()`` holds (True) or ``timeout_s`` passed (False)."""
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: it can lose a cancel on 3.11
                while not predicate():
                    await self._event.wait()
        except TimeoutError:
            return predicate()
        return True


@dataclass(eq=False, kw_only=True)
class Replica:
    """One replica address and the router's view of it."""

    address: str
    replica_id: str = ""
    report: LoadReport | None = None
    reported_at: float = 0.0
    served: ServedModel | None = None
    connected: bool = False
    """The load-report stream is open; False after it broke, until it reports again."""
    removed: bool = False
    """Discovery no longer lists it: finish in-flight work, take no more."""
    inflight: int = 0
    """Requests this router has sent and not yet seen end."""
    inflight_tokens: int = 0
    """Tokens those requests may still generate (max_tokens minus tokens received)."""
    others_requests: int = 0
    """Queued and running requests the last report showed beyond this router's own, at the time."""
    others_tokens: int = 0
    """Likewise for tokens in flight: what other routers' requests may still generate."""
    served_total: int = 0
    last_error: str = ""
    claim: str = ""
    """A model this router asked the replica to load and the replica has not reported yet."""
    leaving: bool = False
    """This router is unloading its model: no new work, whatever the last report says."""
    on_eject: set[Callable[[], None]] = field(default_factory=set)
    """Called at each ejection: the forwarder's attempts there stop waiting on a replica that
    may hang (``forward.EjectionWatch``)."""
    outlier: OutlierRecord = field(default_factory=OutlierRecord)
    """How its attempts ended lately, and its outlier ejection (``outliers``): unlike
    :meth:`eject`, a load report does not end that."""

    @property
    def name(self) -> str:
        return self.replica_id or self.address

    @property
    def state(self) -> ReplicaState:
        return self.report.state if self.report is not None else ReplicaState.UNKNOWN

    @property
    def model(self) -> str:
        """The model it holds or will hold: a claim, else the last report's."""
        if self.claim:
            return self.claim
        return self.report.model if self.report is not None and self.state in HOSTING else ""

    @property
    def device(self) -> str:
        return self.report.device if self.report is not None else ""

    def fresh(self, now: float, stale_after_s: float) -> bool:
        return self.connected and now - self.reported_at <= stale_after_s

    def serves(self, model: str, now: float, stale_after_s: float) -> bool:
        """Takes new work for ``model``: ready for it and not ejected as an outlier."""
        return self.ready_for(model, now, stale_after_s) and not self.outlier.ejected(now)

    def ready_for(self, model: str, now: float, stale_after_s: float) -> bool:
        """Connected, reporting, READY with ``model``, listed (outlier ejection aside)."""
        return (
            not self.removed
            and not self.leaving
            and self.fresh(now, stale_after_s)
            and self.report is not None
            and self.report.state == ReplicaState.READY
            and self.report.model == model
        )

    def eject(self, reason: str) -> None:
        """Stop sending work until the replica reports again."""
        self.connected = False
        self.last_error = reason
        for callback in list(self.on_eject):
            callback()


@dataclass
class Lease:
    """A request the router has sent to a replica; ``received`` tokens lower its weight."""

    replica: Replica
    tokens: int

    def received(self, count: int) -> None:
        used = min(count, self.tokens)
        self.tokens -= used
        self.replica.inflight_tokens -= used


@dataclass
class Registry:
    """Every replica the router knows, by address."""

    stale_after_s: float
    clock: Callable[[], float] = time.monotonic
    replicas: dict[str, Replica] = field(default_factory=dict)
    changes: Changes = field(default_factory=Changes)
    """Notified on every change of what the router knows of a replica."""
    outliers: OutlierDetector | None = None
    """Ejects replicas that fail requests (None: outlier ejection is off)."""

    def add(self, address: str) -> Replica:
        replica = self.replicas.get(address)
        if replica is None or replica.removed:
            replica = self.replicas[address] = Replica(address=address)
            self.changes.notify()
        return replica

    def remove(self, address: str) -> Replica | None:
        replica = self.replicas.pop(address, None)
        if replica is not None:
            replica.removed = True
            self.changes.notify()
        return replica

    def update(self, replica: Replica, report: LoadReport) -> None:
        if replica.report is not None and replica.report.model != report.model:
            replica.outlier = OutlierRecord()  # a model (re)loaded there starts afresh
        replica.report, replica.reported_at = report, self.clock()
        replica.others_requests = max(report.queued + report.running - replica.inflight, 0)
        replica.others_tokens = max(report.tokens_in_flight - replica.inflight_tokens, 0)
        replica.replica_id, replica.connected, replica.last_error = report.replica_id, True, ""
        if replica.claim and (report.model == replica.claim or report.state != ReplicaState.EMPTY):
            replica.claim = ""  # the replica took the load (or something else): reports rule
        self.changes.notify()

    def eject(self, replica: Replica, reason: str) -> None:
        """Stop sending work to ``replica`` until it reports again."""
        replica.eject(reason)
        self.changes.notify()

    def candidates(self, model: str, exclude: Iterable[Replica] = ()) -> list[Replica]:
        """Replicas that take work for ``model``; one in its re-admission ramp after an
        outlier ejection is among them by chance (by all of them when none else is left)."""
        now, skip = self.clock(), set(map(id, exclude))
        serving = [
            r
            for r in self.replicas.values()
            if id(r) not in skip and r.serves(model, now, self.stale_after_s)
        ]
        if self.outliers is None:
            return serving
        admitted = [r for r in serving if self.outliers.admits(r.outlier, now)]
        return admitted or serving

    def ended(self, replica: Replica, outcome: Outcome) -> Ejection | None:
        """Count how an attempt on ``replica`` ended; the outlier ejection it caused, if any."""
        if self.outliers is None:
            return None
        now, model = self.clock(), replica.report.model if replica.report is not None else ""
        peers = [
            r.outlier for r in self.replicas.values() if r.ready_for(model, now, self.stale_after_s)
        ]
        ejection = self.outliers.record(replica.outlier, outcome, now, peers)
        if ejection is not None:
            self.changes.notify()
        return ejection

    def outlier_note(self, replica: Replica) -> str:
        """Its outlier ejection or ramp in words ("" when neither), for the Admin service."""
        if self.outliers is None:
            return ""
        return self.outliers.note(replica.outlier, self.clock())

    def find(self, name: str) -> Replica | None:
        """A replica by id (as reported) or address."""
        return next((r for r in self.replicas.values() if name in (r.replica_id, r.address)), None)

    def knows(self, model: str) -> bool:
        """Some replica hosts (or last reported hosting) ``model``, healthy or not."""
        return any(r.report is not None and r.report.model == model for r in self.replicas.values())

    def ready_models(self) -> dict[str, list[Replica]]:
        """Models with at least one replica taking work, and those replicas."""
        now, out = self.clock(), dict[str, list[Replica]]()
        for r in self.replicas.values():
            if r.report is not None and r.serves(r.report.model, now, self.stale_after_s):
                out.setdefault(r.report.model, []).append(r)
        return out

    @contextmanager
    def lease(self, replica: Replica, tokens: int) -> Iterator[Lease]:
        """Count a request against ``replica`` while it runs (least-busy reads these counts)."""
        lease = Lease(replica, tokens)
        replica.inflight += 1
        replica.inflight_tokens += tokens
        replica.served_total += 1
        try:
            yield lease
        finally:
            replica.inflight -= 1
            replica.inflight_tokens -= lease.tokens
            self.changes.notify()
