"""The replica: hosts at most one model, tracks its state, admits and drains work."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

from meshllm.api.bounds import shown
from meshllm.api.errors import FailedPrecondition, MeshError, NotFound, Unavailable
from meshllm.api.spec import ModelSpec
from meshllm.api.types import LoadReport, ModelInfo, ReplicaState, ReplicaStatus
from meshllm.replica.config import ReplicaConfig
from meshllm.replica.engines.process import ProcessEngine
from meshllm.replica.memory import device_memory
from meshllm.replica.model import LoadedModel
from meshllm.replica.types import Chunk, GenerationRequest

log = logging.getLogger(__name__)


def package_version() -> str:
    """This replica's ``meshllm-replica`` version, reported in its status."""
    try:
        return version("meshllm-replica")
    except PackageNotFoundError:
        return "unknown"


class ThroughputMeter:
    """Tokens per second over a sliding window of one-second buckets."""

    def __init__(self, window_s: int = 5, clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window_s
        self._clock = clock
        self._buckets: deque[list[float]] = deque()

    def add(self, tokens: int) -> None:
        second = float(int(self._clock()))
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += tokens
        else:
            self._buckets.append([second, float(tokens)])

    def rate(self) -> float:
        now = self._clock()
        while self._buckets and self._buckets[0][0] <= now - self._window:
            self._buckets.popleft()
        return sum(b[1] for b in self._buckets) / self._window


class Replica:
    """Model host of one replica process; the gRPC services are thin layers over it."""

    def __init__(self, config: ReplicaConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.version = package_version()
        self.state = ReplicaState.EMPTY
        self.spec: ModelSpec | None = None
        self.error = ""
        self.model: LoadedModel | None = None
        self.requests_total = 0
        self.tokens_total = 0
        self._meter = ThroughputMeter()
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._lifecycle = asyncio.Lock()
        self._changed = asyncio.Condition()
        self.state_changes = 0
        """How many times the state changed (load reports follow each change at once)."""
        self._load_task: asyncio.Task[None] | None = None
        self._unloading = False
        self._shutting_down = False
        self.on_state_change: list[Callable[[ReplicaState], Awaitable[None]]] = []
        self._background: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def load(self, spec: ModelSpec, *, wait: bool) -> None:
        """Start loading ``spec`` (idempotent for the model already loaded or loading)."""
        spec.validate()
        async with self._lifecycle:
            if (
                self.spec is not None
                and self.spec.id == spec.id
                and self.state in (ReplicaState.LOADING, ReplicaState.READY)
            ):
                task = self._load_task
            elif self.state in (ReplicaState.EMPTY, ReplicaState.FAILED):
                self.spec, self.error = spec, ""
                await self._set_state(ReplicaState.LOADING)
                task = self._load_task = asyncio.create_task(self._load(spec))
            else:
                loaded = self.spec.id if self.spec else "?"
                raise FailedPrecondition(
                    f"replica hosts {loaded!r} ({self.state.value}); "
                    f"unload it before loading {spec.id!r}",
                    reason="REPLICA_BUSY",
                )
        if wait and task is not None:
            await asyncio.shield(task)

    async def _load(self, spec: ModelSpec) -> None:
        started = time.perf_counter()
        try:
            model = await asyncio.to_thread(
                LoadedModel.load,
                spec,
                device=self.config.device,
                replica_name=self.name,
                max_input_chars=self.config.max_input_chars,
                batch_window_ms=self.config.batch_window_ms,
                default_coalesce_ms=self.config.default_coalesce_ms,
                engine_process=self.config.engine_process,
            )
            if isinstance(model.engine, ProcessEngine):
                model.engine.on_exit = functools.partial(self._engine_died, model)
            await model.engine.start()
        except Exception as e:  # any load failure leaves the replica idle, with the reason
            self.error = e.message if isinstance(e, MeshError) else f"{type(e).__name__}: {e}"
            log.error("loading %s from %s failed: %s", spec.id, spec.path, self.error)
            await self._set_state(ReplicaState.FAILED)
            return
        self.model = model
        log.info("loaded %s (%s) in %.2fs", spec.id, spec.engine, time.perf_counter() - started)
        await self._set_state(ReplicaState.READY)

    def _engine_died(self, model: LoadedModel, reason: str) -> None:
        """The engine process of ``model`` ended on its own: its requests have failed already;
        the replica becomes FAILED with the reason, and a new load starts a new process."""
        if self.model is not model:
            return
        self.model, self.error = None, reason
        task = asyncio.get_running_loop().create_task(self._set_state(ReplicaState.FAILED))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def unload(self, *, drain_timeout_s: float, model: str = "") -> None:
        """Drain (stop admitting, let in-flight finish up to the timeout), then free the model."""
        async with self._lifecycle:
            if model and (self.spec is None or self.spec.id != model):
                raise NotFound(f"model {shown(model)} is not loaded on this replica")
            if self._load_task is not None and not self._load_task.done():
                await self._load_task
            if self.state in (ReplicaState.EMPTY, ReplicaState.FAILED):
                self.spec, self.error = None, ""
                await self._set_state(ReplicaState.EMPTY)
                return
            self._unloading = True
            try:
                await self._set_state(ReplicaState.DRAINING)
                await self.wait_idle(drain_timeout_s or self.config.drain_grace_s)
                await self._set_state(ReplicaState.UNLOADING)
                if self.model is not None:
                    await self.model.close()
                self.model, self.spec = None, None
                await self._set_state(ReplicaState.EMPTY)
            finally:
                self._unloading = False

    async def drain(self, *, shutdown: bool = False) -> None:
        """Stop admitting new work, keeping the model; in-flight requests go on. Idempotent.

        ``shutdown`` (SIGTERM) also drains a replica still loading, and forbids ``undrain``.
        """
        self._shutting_down = self._shutting_down or shutdown
        if self.state == ReplicaState.READY or (shutdown and self.state == ReplicaState.LOADING):
            await self._set_state(ReplicaState.DRAINING)
        elif not shutdown and self.state not in (ReplicaState.DRAINING, ReplicaState.UNLOADING):
            raise FailedPrecondition(
                f"nothing to drain: the replica is {self.state.value}", reason="REPLICA_NOT_READY"
            )

    async def undrain(self) -> None:
        """Admit new work again after ``drain``. Idempotent."""
        if self.state == ReplicaState.READY:
            return
        if self.state != ReplicaState.DRAINING or self._unloading or self._shutting_down:
            why = f"the replica is {self.state.value}"
            if self._unloading:
                why = "an unload is under way"
            elif self._shutting_down:
                why = "the replica is shutting down"
            raise FailedPrecondition(f"cannot undrain: {why}", reason="REPLICA_NOT_DRAINED")
        await self._set_state(ReplicaState.READY)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if the timeout passed first."""
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: it can lose a cancel on 3.11
                await self._idle.wait()
        except TimeoutError:
            log.warning("drain timeout: %d requests still in flight", self._inflight)
            return False
        return True

    async def close(self) -> None:
        if self.model is not None:
            await self.model.close()
            self.model = None

    async def _set_state(self, state: ReplicaState) -> None:
        self.state = state
        self.state_changes += 1
        for callback in self.on_state_change:
            await callback(state)
        async with self._changed:
            self._changed.notify_all()

    async def wait_change(self, timeout_s: float, since: int) -> int:
        """Return once the state changed after change number ``since`` (at once if it already
        has: a change while the caller was busy is not lost), or after ``timeout_s``; returns
        the current change number."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):  # not wait_for: it can lose a cancel on 3.11
                    await self._changed.wait_for(lambda: self.state_changes != since)
        return self.state_changes

    # -- requests -------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return (
            [self.model.info()]
            if self.model is not None and self.state == ReplicaState.READY
            else []
        )

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        model = self._admit(req.model)
        self._inflight += 1
        self._idle.clear()
        self.requests_total += 1
        try:
            prepared = await model.prepare(req)
            async for chunk in model.stream(prepared):
                if chunk.token_ids:
                    self._meter.add(len(chunk.token_ids))
                    self.tokens_total += len(chunk.token_ids)
                yield chunk
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def _admit(self, model_id: str) -> LoadedModel:
        state, spec = self.state, self.spec
        if spec is not None and model_id and model_id != spec.id:
            raise NotFound(f"unknown model {shown(model_id)}; this replica serves {spec.id!r}")
        if state == ReplicaState.READY and self.model is not None:
            return self.model
        if state == ReplicaState.LOADING:
            raise Unavailable(
                f"model {shown(model_id)} is still loading",
                reason="MODEL_LOADING",
                retry_after=1.0,
            )
        if state in (ReplicaState.DRAINING, ReplicaState.UNLOADING):
            raise Unavailable(
                "replica is draining; retry on another replica",
                reason="REPLICA_DRAINING",
                retry_after=1.0,
            )
        raise FailedPrecondition(
            f"no model is loaded on this replica (asked for {shown(model_id)})",
            reason="MODEL_NOT_LOADED",
        )

    # -- reports --------------------------------------------------------------------------------

    def load_report(self) -> LoadReport:
        stats = self.model.engine.stats() if self.model is not None else None
        return LoadReport(
            replica_id=self.name,
            state=self.state,
            model=self.spec.id
            if self.spec is not None and self.state != ReplicaState.FAILED
            else "",
            queued=stats.queued if stats else 0,
            running=stats.running if stats else 0,
            tokens_in_flight=stats.tokens_in_flight if stats else 0,
            tokens_per_second=self._meter.rate(),
            cache_utilization=stats.cache_utilization if stats else 0.0,
            requests_total=self.requests_total,
            tokens_total=self.tokens_total,
            timestamp_ms=int(time.time() * 1000),
            device=self.config.device,
            capacity=stats.capacity if stats else 0,
        )

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            replica_id=self.name,
            state=self.state,
            spec=self.spec,
            device=self.config.device,
            error=self.error,
            load=self.load_report(),
            memory=device_memory(self.config.device),
            version=self.version,
        )
