"""ProcessEngine: any engine, run in its own process (``engines/worker.py``), behind the same
``Engine`` protocol.

The front process (gRPC, tokenization, detokenization, stop strings, metrics) and the engine's
own Python (its generator loop or per-token callbacks) then hold two GILs instead of sharing one:
the design of vLLM V1's engine core and SGLang's scheduler process. The engine process dying
(a segfault, a CUDA error, an OOM kill) ends every request it had with ``EngineDied`` and tells
``on_exit``; closing it ends the process, so its device memory goes back to the system.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import socket
import sys
from collections.abc import Callable
from typing import Any

from meshllm.api.errors import FailedPrecondition, InvalidArgument, MeshError, Unavailable
from meshllm.api.types import FinishReason
from meshllm.replica.engines import ipc
from meshllm.replica.engines.base import EngineSettings
from meshllm.replica.engines.stream import TokenStream
from meshllm.replica.types import EngineStats, SamplingParams

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 30.0


class EngineDied(Exception):
    """The engine process ended while this request was in it."""


class RemoteStream(TokenStream):
    """A request's stream in the front process; a cancel is forwarded to the engine process."""

    def __init__(
        self, engine: ProcessEngine, rid: int, *, max_tokens: int, eos_ids: frozenset[int]
    ) -> None:
        if engine.loop is None:
            raise RuntimeError("engine not started")
        super().__init__(engine.loop, max_tokens=max_tokens, eos_ids=eos_ids)
        self._engine, self.rid = engine, rid
        self.engine_generated = 0
        """Tokens the engine process generated for it, as it last reported."""

    @property
    def produced(self) -> int:
        return max(self.engine_generated, self.generated)

    def _notify(self) -> None:
        self._wake()  # the producer is the front's own event loop: no cross-thread wake-up

    def cancel(self) -> None:
        if not self.cancelled and not self.done:
            self._engine.send([ipc.CANCEL, self.rid])
        super().cancel()


class ProcessEngine:
    def __init__(self, name: str, settings: EngineSettings) -> None:
        self.name = name
        self.settings = settings
        self.on_exit: Callable[[str], None] | None = None
        """Called once if the engine process ends without being closed, with why."""
        self.pid = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._streams: dict[int, RemoteStream] = {}
        self._ids = itertools.count(1)
        self._remote = EngineStats()
        self._closing = False
        self._closed = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Start the engine process and wait until its model is loaded (its error if it fails)."""
        self.loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [sys.executable, "-m", "meshllm.replica.engines.worker", str(theirs.fileno())]
        self._proc = await asyncio.create_subprocess_exec(*cmd, pass_fds=(theirs.fileno(),))
        theirs.close()
        self.pid = self._proc.pid
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._writer.write(ipc.raw_frame(pickle.dumps((self.name, self.settings))))
        first = await ipc.read(reader)
        if first is None or first[0] != ipc.READY:
            self._writer.close()
            raise _load_error(first, await self._proc.wait())
        self._remote = ipc.stats_from_wire(first[2])  # its capacity, before any step
        self._reader_task = asyncio.create_task(self._read(reader), name=f"engine {self.pid}")

    def send(self, message: list[Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(ipc.frame(message))

    def submit(
        self, prompt_ids: tuple[int, ...], sampling: SamplingParams, priority: int
    ) -> TokenStream:
        rid = next(self._ids)
        stream = RemoteStream(
            self, rid, max_tokens=sampling.max_tokens, eos_ids=self.settings.eos_ids
        )
        if self._reader_task is None or self._reader_task.done():
            stream.finish(FinishReason.ERROR, EngineDied("the engine process is not running"))
            return stream
        self._streams[rid] = stream
        self.send([ipc.SUBMIT, rid, list(prompt_ids), ipc.sampling_to_wire(sampling), priority])
        return stream

    def stats(self) -> EngineStats:
        """Counts from this side (exact and current); cache use from the engine's last report."""
        live = list(self._streams.values())
        running = sum(s.started is not None for s in live)
        left = sum(s.max_tokens - s.generated for s in live)
        r = self._remote
        return EngineStats(
            queued=len(live) - running,
            running=running,
            tokens_in_flight=left,
            cache_utilization=r.cache_utilization,
            extra=dict(r.extra),
            capacity=r.capacity,
        )

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (message := await ipc.read(reader)) is not None and message[0] != ipc.CLOSED:
                if message[0] == ipc.STEP:
                    self._step(message[1], message[2])
        except (OSError, ValueError) as e:  # a broken or garbled pipe is a dead engine too
            log.error("engine process %d: %s", self.pid, e)
        await self._ended()

    def _step(self, moved: list[list[Any]], report: list[Any] | None) -> None:
        for rid, tokens, started, finish, error, generated in moved:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            stream.engine_generated = generated
            if started and stream.started is None:
                stream.mark_started()
            for token in tokens:
                if stream.push(token):
                    break
            if finish is not None:
                stream.finish(FinishReason(finish), RuntimeError(error) if error else None)
            if stream.done:
                del self._streams[rid]
        if report is not None:
            self._remote = ipc.stats_from_wire(report)

    async def _ended(self) -> None:
        proc = self._proc
        code = await proc.wait() if proc is not None else None
        if self._closing:
            reason = f"engine process {self.pid} closed"
        else:
            reason = f"engine process {self.pid} exited with code {code}"
            log.error("%s with %d requests in flight", reason, len(self._streams))
        for stream in list(self._streams.values()):
            stream.finish(
                FinishReason.CANCELLED if self._closing else FinishReason.ERROR,
                None if self._closing else EngineDied(reason),
            )
        self._streams.clear()
        self._closed.set()
        if not self._closing and self.on_exit is not None:
            self.on_exit(reason)

    async def close(self) -> None:
        """Cancel what is left, stop the engine process and wait until it is gone."""
        self._closing = True
        self.send([ipc.CLOSE])
        if self._reader_task is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._closed.wait()
            except TimeoutError:
                log.error(
                    "engine process %d did not stop in %.0fs; killing it", self.pid, CLOSE_TIMEOUT_S
                )
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        if self._writer is not None:
            self._writer.close()


def _load_error(first: list[Any] | None, code: int | None) -> MeshError:
    if first is not None and first[0] == ipc.FAILED:
        _, status, message, reason = first
        kind = {"INVALID_ARGUMENT": InvalidArgument, "UNAVAILABLE": Unavailable}.get(
            status, FailedPrecondition
        )
        return kind(message, reason=reason or "ENGINE_LOAD_FAILED")
    return FailedPrecondition(
        f"the engine process exited with code {code} while loading", reason="ENGINE_LOAD_FAILED"
    )
