"""The wire between the replica's front process and its engine process: msgpack frames, each
prefixed by its length, over one Unix socket pair. The first frame (front to engine) is the
engine's name and settings, pickled (both ends are the same program and user); every other frame
is a msgpack list whose first item names the message.

Front -> engine: ``[SUBMIT, rid, prompt_ids, sampling, priority]``, ``[CANCEL, rid]``, ``[CLOSE]``.
Engine -> front: ``[READY, pid, stats]`` or ``[FAILED, status_name, message]`` once, then
``[STEP, [[rid, tokens, started, finish, error, generated], ...], stats]`` (every sequence that moved since
the last message: one message per engine step, or fewer), and ``[CLOSED]`` at the end.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import asdict
from typing import Any

import msgpack

from meshllm.replica.types import EngineStats, SamplingParams

SUBMIT, CANCEL, CLOSE = "submit", "cancel", "close"
READY, FAILED, STEP, CLOSED = "ready", "failed", "step", "closed"
_LENGTH = struct.Struct("!I")


def frame(message: list[Any]) -> bytes:
    body: bytes = msgpack.packb(message)
    return _LENGTH.pack(len(body)) + body


def raw_frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


async def read_raw(reader: asyncio.StreamReader) -> bytes | None:
    """One frame's bytes; None at a clean end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        return await reader.readexactly(_LENGTH.unpack(head)[0])
    except asyncio.IncompleteReadError:
        return None


async def read(reader: asyncio.StreamReader) -> list[Any] | None:
    body = await read_raw(reader)
    return None if body is None else list(msgpack.unpackb(body, use_list=True))


def sampling_to_wire(s: SamplingParams) -> dict[str, Any]:
    out = asdict(s)
    out["stop"] = list(s.stop)
    return out


def sampling_from_wire(d: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**{**d, "stop": tuple(d["stop"])})


def stats_to_wire(s: EngineStats) -> list[Any]:
    return [s.queued, s.running, s.tokens_in_flight, s.cache_utilization, s.extra, s.capacity]


def stats_from_wire(v: list[Any]) -> EngineStats:
    return EngineStats(
        queued=v[0],
        running=v[1],
        tokens_in_flight=v[2],
        cache_utilization=v[3],
        extra=v[4],
        capacity=v[5],
    )
