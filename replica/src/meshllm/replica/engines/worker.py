"""The engine process: ``python -m meshllm.replica.engines.worker FD``.

It owns the model, the batching and the device. It builds the named engine from the settings the
front sends first, then relays: submissions and cancels come in; every sequence that moved (started,
new tokens, finished) goes out, batched over all of them into one message per wake-up. Nothing
here tokenizes, detokenizes or speaks gRPC: that is the front process's work, on its own GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import socket
import sys
import threading
import time
from typing import Any

from meshllm.api.errors import MeshError, status_name
from meshllm.replica.engines import ipc
from meshllm.replica.engines.base import Engine
from meshllm.replica.engines.registry import create_engine
from meshllm.replica.engines.stream import TokenStream

log = logging.getLogger(__name__)
STATS_EVERY_S = 0.05


class Relay:
    """Sends what changed on the engine's streams; engine threads only mark them dirty."""

    def __init__(self, engine: Engine, writer: asyncio.StreamWriter) -> None:
        self._engine, self._writer = engine, writer
        self._loop = asyncio.get_running_loop()
        self.streams: dict[int, TokenStream] = {}
        self._dirty: set[int] = set()
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._stats_at = 0.0

    def add(self, rid: int, stream: TokenStream) -> None:
        self.streams[rid] = stream
        stream.observer = functools.partial(self.changed, rid)
        self.changed(rid, stream)

    def changed(self, rid: int, stream: TokenStream) -> None:
        """Any thread: mark ``rid`` moved; wake the sender unless a wake-up is pending (a rid
        already relayed to its end is skipped by ``flush``)."""
        with self._lock:
            first = not self._dirty
            self._dirty.add(rid)
        if first:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.flush()
            await self._writer.drain()

    def flush(self, *, stats: bool = False) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        moved: list[list[Any]] = []
        for rid in sorted(dirty):
            stream = self.streams.get(rid)
            if stream is None:
                continue
            # the finish first: a stream seen finished has all its tokens pending already
            finish = stream.finish_reason.value if stream.finish_reason is not None else None
            tokens = stream.take()
            error = f"{type(stream.error).__name__}: {stream.error}" if stream.error else None
            moved.append([rid, tokens, stream.started is not None, finish, error, stream.generated])
            if finish is not None:
                del self.streams[rid]
        now = time.perf_counter()
        report = None
        if stats or now - self._stats_at >= STATS_EVERY_S:
            self._stats_at, report = now, ipc.stats_to_wire(self._engine.stats())
        if moved or report is not None:
            self._writer.write(ipc.frame([ipc.STEP, moved, report]))


async def serve(sock: socket.socket) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    init = await ipc.read_raw(reader)
    if init is None:
        return 0
    name, settings = pickle.loads(init)  # noqa: S301 (the front process, same program and user)
    try:
        engine = create_engine(name, settings)
        await engine.start()
    except Exception as e:  # the front reports it: the replica goes FAILED with the reason
        message = e.message if isinstance(e, MeshError) else f"{type(e).__name__}: {e}"
        reason = e.reason if isinstance(e, MeshError) else ""
        writer.write(ipc.frame([ipc.FAILED, status_name(e), message, reason]))
        await writer.drain()
        return 1
    writer.write(ipc.frame([ipc.READY, os.getpid(), ipc.stats_to_wire(engine.stats())]))
    relay = Relay(engine, writer)
    sender = asyncio.create_task(relay.run(), name="relay")
    try:
        await _commands(reader, engine, relay)
    finally:
        await engine.close()
        sender.cancel()
        with contextlib.suppress(OSError):  # the front may be gone already (killed)
            relay.flush(stats=True)
            writer.write(ipc.frame([ipc.CLOSED]))
            await writer.drain()
            writer.close()
    return 0


async def _commands(reader: asyncio.StreamReader, engine: Engine, relay: Relay) -> None:
    while (message := await ipc.read(reader)) is not None:
        kind = message[0]
        if kind == ipc.SUBMIT:
            _, rid, prompt, sampling, priority = message
            stream = engine.submit(tuple(prompt), ipc.sampling_from_wire(sampling), priority)
            relay.add(rid, stream)
        elif kind == ipc.CANCEL and (cancelled := relay.streams.get(message[1])) is not None:
            cancelled.cancel()
        elif kind == ipc.CLOSE:
            return


def main() -> None:
    logging.basicConfig(level=os.environ.get("MESHLLM_ENGINE_LOG_LEVEL", "WARNING"))
    sock = socket.socket(fileno=int(sys.argv[1]))
    sys.exit(asyncio.run(serve(sock)))


if __name__ == "__main__":
    main()
