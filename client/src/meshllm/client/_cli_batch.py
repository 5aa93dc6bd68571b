"""``meshllm generate --input in.jsonl --output out.jsonl [--resume]``: a file through the mesh.

The rows' format and the resume rules are in ``_jsonl``. Rows go out in completion order, each
with its input ``index`` (``--ordered``: input order, refused lines included, at the cost of
waiting for slow rows). Aborted rows (``--abort-after``) are not written: ``--resume`` runs
them later; nor are the rows in flight when the run is interrupted (Ctrl-C), which says how to
resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from meshllm.api.errors import Aborted, InvalidArgument
from meshllm.client._abort import AbortPolicy
from meshllm.client._async import AsyncClient
from meshllm.client._batch import BatchOptions, Refused
from meshllm.client._heartbeat import Counts, Heartbeat, beat
from meshllm.client._jsonl import (
    DoneSet,
    RowWriter,
    count_lines,
    parse_row,
    read_rows,
    result_row,
    resume,
)
from meshllm.client._options import RequestFields

EXIT_FAILED_ROWS = 1
EXIT_ABORTED = 3


@dataclass(frozen=True, kw_only=True)
class JsonlJob:
    input: Path
    output: Path | None
    """None: standard output (no resume)."""
    resume: bool = False
    model: str
    fields: RequestFields = field(default_factory=RequestFields)
    """Request fields for every row (a row's own fields win)."""
    chat: bool = False
    """Send a row's text ``prompt`` as a chat of one user message."""
    options: BatchOptions = field(
        default_factory=lambda: BatchOptions(ordered=False, abort=AbortPolicy(), progress=True)
    )
    """How the batch runs (``on_result`` is not used: rows are written as they come)."""
    heartbeat_s: float = 0.0
    """A status line on stderr this often (0: none; the CLI sets it without a progress bar)."""
    stall_s: float = 0.0
    """Warn on stderr when no row finished for this long (0: never)."""


@dataclass
class Tally(Counts):
    aborted: int = 0
    skipped: int = 0


class _Rows:
    """The input rows still to run, read lazily; remembers which input line each batch item
    came from until its result is written (only the batch's window is held). A line that is
    no usable request goes through the batch as ``Refused``, so it keeps its place in order."""

    def __init__(self, job: JsonlJob, done: DoneSet) -> None:
        self.job, self.done = job, done
        self.origin: dict[int, tuple[int, dict[str, Any]]] = {}
        self._total = max(0, count_lines(job.input) - done.count)

    def __len__(self) -> int:
        return self._total

    def __iter__(self) -> Iterator[dict[str, Any] | Refused]:
        for position, (index, line) in enumerate(read_rows(self.job.input, self.done)):
            try:
                row = parse_row(index, line, chat=self.job.chat)
            except InvalidArgument as e:  # never sent; a permanent error row
                self.origin[position] = (index, {})
                yield Refused(e)
                continue
            self.origin[position] = (row.index, row.passthrough)
            yield row.request


async def run_jsonl(client: AsyncClient, job: JsonlJob) -> int:
    """Run the job; returns the exit status (0 all rows done, 1 some failed, 3 aborted)."""
    if (
        job.output is not None
        and not job.resume
        and job.output.exists()
        and job.output.stat().st_size
    ):
        print(
            f"meshllm: {job.output} exists; --resume continues it (or remove it first)",
            file=sys.stderr,
        )
        return 2
    done = resume(job.output) if job.output is not None and job.resume else DoneSet()
    tally = Tally(skipped=done.count)
    out: BinaryIO = job.output.open("ab", buffering=0) if job.output else sys.stdout.buffer
    rows = _Rows(job, done)
    heartbeat = Heartbeat(
        total=len(rows), every_s=job.heartbeat_s, stall_s=job.stall_s, now=time.monotonic()
    )
    beating = asyncio.create_task(beat(heartbeat, tally, lambda: len(rows.origin), time.monotonic))
    try:
        await _write_rows(client, job, rows, RowWriter(out), tally)
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels this task
        print(_interrupted(job, tally), file=sys.stderr, flush=True)
        raise
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        if job.output is not None:
            out.close()
    return _report(tally)


async def _write_rows(
    client: AsyncClient, job: JsonlJob, rows: _Rows, writer: RowWriter, tally: Tally
) -> None:
    items = client.iter_batch_with(rows, model=job.model, fields=job.fields, options=job.options)
    async for item in items:
        index, passthrough = rows.origin.pop(item.index)
        if isinstance(item.error, Aborted):
            tally.aborted += 1
            continue
        writer.write(result_row(index, passthrough, item.result, item.error))
        tally.done += item.ok
        tally.failed += not item.ok
        tally.tokens += item.result.usage.completion_tokens if item.result is not None else 0


def _interrupted(job: JsonlJob, tally: Tally) -> str:
    written = f"meshllm: interrupted after {tally.finished} rows ({tally.failed} failed)"
    if job.output is None:
        return f"{written}; to be able to resume a run, give --output FILE (then --resume)"
    return f"{written}; they are in {job.output}: run the same command with --resume to continue"


def _report(tally: Tally) -> int:
    resumed = f", {tally.skipped} already done" if tally.skipped else ""
    print(f"meshllm: {tally.done} rows done, {tally.failed} failed{resumed}", file=sys.stderr)
    if tally.aborted:
        print(
            f"meshllm: aborted; {tally.aborted} rows not written: run again with --resume",
            file=sys.stderr,
        )
        return EXIT_ABORTED
    return EXIT_FAILED_ROWS if tally.failed else 0
