"""``meshllm generate --input in.jsonl --output out.jsonl [--resume]``: a file through the mesh.

The rows' format and the resume rules are in ``_jsonl``. Rows go out in completion order, each
with its input ``index`` (``--ordered``: input order, at the cost of waiting for slow rows).
Aborted rows (``--abort-after``) are not written: ``--resume`` runs them later.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from meshllm.api.errors import Aborted, InvalidArgument
from meshllm.client._abort import AbortPolicy
from meshllm.client._async import AsyncClient
from meshllm.client._batch import BatchOptions
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
    options: BatchOptions = field(
        default_factory=lambda: BatchOptions(ordered=False, abort=AbortPolicy(), progress=True)
    )
    """How the batch runs (``on_result`` is not used: rows are written as they come)."""


@dataclass
class Tally:
    done: int = 0
    failed: int = 0
    aborted: int = 0
    skipped: int = 0


class _Rows:
    """The input rows still to run, read lazily; remembers which input line each batch item
    came from until its result is written (only the batch's window is held)."""

    def __init__(self, job: JsonlJob, done: DoneSet, writer: RowWriter, tally: Tally) -> None:
        self.job, self.done, self.writer, self.tally = job, done, writer, tally
        self.origin: dict[int, tuple[int, dict[str, Any]]] = {}
        self._total = max(0, count_lines(job.input) - done.count)

    def __len__(self) -> int:
        return self._total

    def __iter__(self) -> Iterator[dict[str, Any]]:
        position = 0
        for index, line in read_rows(self.job.input, self.done):
            try:
                row = parse_row(index, line)
            except InvalidArgument as e:  # never sent; a permanent error row
                self.writer.write(result_row(index, {}, None, e))
                self.tally.failed += 1
                continue
            self.origin[position] = (row.index, row.passthrough)
            position += 1
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
    try:
        writer = RowWriter(out)
        rows = _Rows(job, done, writer, tally)
        items = client.iter_batch_with(
            rows, model=job.model, fields=job.fields, options=job.options
        )
        async for item in items:
            index, passthrough = rows.origin.pop(item.index)
            if isinstance(item.error, Aborted):
                tally.aborted += 1
                continue
            writer.write(result_row(index, passthrough, item.result, item.error))
            tally.done += item.ok
            tally.failed += not item.ok
    finally:
        if job.output is not None:
            out.close()
    return _report(tally)


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
