"""A long batch's signs of life on stderr: a status line every so often when there is no
progress bar (done, in flight, failed, tokens, rate, ETA), and a warning when no row has
finished for a while (a mesh that hangs looks like a slow one otherwise).

``Heartbeat`` is pure (fed the clock and the counts); ``beat`` prints its lines from a task.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO


@dataclass
class Counts:
    """What a batch has done so far (this run)."""

    done: int = 0
    failed: int = 0
    tokens: int = 0
    """Completion tokens of the rows done."""

    @property
    def finished(self) -> int:
        return self.done + self.failed


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Heartbeat:
    """``lines(now, counts, in_flight)``: what to print now (usually nothing)."""

    def __init__(self, *, total: int | None, every_s: float, stall_s: float, now: float) -> None:
        self.total, self.every_s, self.stall_s = total, every_s, stall_s
        self.start = self.last_beat = self.last_progress = self.last_warning = now
        self.finished = 0

    def lines(self, now: float, counts: Counts, in_flight: int) -> list[str]:
        out = []
        if counts.finished != self.finished:
            self.finished, self.last_progress = counts.finished, now
        if self.every_s > 0 and now - self.last_beat >= self.every_s:
            self.last_beat = now
            out.append(self.status(now, counts, in_flight))
        quiet = now - max(self.last_progress, self.last_warning)
        if self.stall_s > 0 and quiet >= self.stall_s:
            self.last_warning = now
            out.append(
                f"meshllm: warning: no row finished in the last "
                f"{duration(now - self.last_progress)} ({in_flight} in flight)"
            )
        return out

    def status(self, now: float, counts: Counts, in_flight: int) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = counts.finished / elapsed
        of = f"/{self.total}" if self.total is not None else ""
        line = (
            f"meshllm: {counts.finished}{of} rows finished ({counts.done} done, "
            f"{counts.failed} failed), {in_flight} in flight, {counts.tokens} tokens, {rate:.1f} rows/s, "
            f"{counts.tokens / elapsed:.0f} tokens/s"
        )
        if self.total is not None and rate > 0:
            line += f", ETA {duration(max(self.total - counts.finished, 0) / rate)}"
        return line


async def beat(
    heartbeat: Heartbeat,
    counts: Counts,
    in_flight: Callable[[], int],
    clock: Callable[[], float],
    out: TextIO | None = None,
) -> None:
    """Print the heartbeat's lines until cancelled."""
    intervals = [s for s in (heartbeat.every_s, heartbeat.stall_s) if s > 0]
    if not intervals:
        return
    tick = min(min(intervals) / 4, 1.0)
    while True:
        await asyncio.sleep(tick)
        for line in heartbeat.lines(clock(), counts, in_flight()):
            print(line, file=out or sys.stderr, flush=True)
