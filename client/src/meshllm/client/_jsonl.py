"""JSONL in, JSONL out, and resuming: the file side of ``meshllm generate --input``.

Input: one JSON object per line, ``{"prompt": ...}`` or ``{"messages": [...]}``; request fields
(``max_tokens``, ``temperature``, ...) override the command line's for that row; every other key
(an ``"id"``, metadata) is copied to the output row unchanged. Blank lines are skipped; the
row's ``index`` is its 0-based line number in the input file.

Output: one row per input row, written as one complete line (a single ``write``) as results
arrive, in completion order; each carries its ``index``. A result row has ``text``,
``finish_reason``, ``usage``, ``timing``, ``replica``, ``cached`` and ``"error": null``; a failed
row has ``"error": {"code", "message", "reason"}``.

Resume reads the output back: rows with a result, and rows whose error is permanent (a bad
request: retrying cannot help), are done; rows with a transient error (UNAVAILABLE,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ABORTED) or cancelled by the mesh (CANCELLED, or a reply
whose finish reason is ``cancelled`` or ``error``) are dropped from the file and run again; a last
line cut short by a crash is cut away. So after any number of crashes and resumes, the output
holds exactly one row per input row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from meshllm.api.errors import InvalidArgument, MeshError
from meshllm.client._retry import TRANSIENT
from meshllm.client._types import Completion

REQUEST_FIELDS = frozenset(
    {
        "prompt",
        "messages",
        "token_ids",
        "instructions",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "max_tokens",
        "stop",
        "seed",
        "priority",
    }
)
"""Input keys that shape the request; all others are passed through to the output row."""
_RUN_AGAIN = frozenset(code.name for code in TRANSIENT) | {"CANCELLED"}
"""Error codes of rows that ``--resume`` runs again."""
_CUT_SHORT = frozenset({"cancelled", "error"})
"""Finish reasons of replies that ``--resume`` runs again."""


@dataclass(frozen=True)
class InputRow:
    index: int
    request: dict[str, Any]
    passthrough: dict[str, Any]


def parse_row(index: int, line: bytes, *, chat: bool = False) -> InputRow:
    """One input line; InvalidArgument when it is not a usable request. ``chat``: a text
    ``prompt`` goes as a chat of one user message (the model's chat template applies)."""
    try:
        data = json.loads(line)
    except ValueError as e:
        raise InvalidArgument(f"line {index + 1}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"line {index + 1}: a JSON object is needed")
    request = {k: v for k, v in data.items() if k in REQUEST_FIELDS}
    if ("prompt" in request) == ("messages" in request):
        raise InvalidArgument(f'line {index + 1}: needs exactly one of "prompt" and "messages"')
    if chat and isinstance(request.get("prompt"), str):
        request["messages"] = [{"role": "user", "content": request.pop("prompt")}]
    return InputRow(index, request, {k: v for k, v in data.items() if k not in REQUEST_FIELDS})


def read_rows(path: Path, done: DoneSet) -> Iterator[tuple[int, bytes]]:
    """(index, line) of each non-blank input line not already done, read lazily."""
    with path.open("rb") as f:
        for index, line in enumerate(f):
            if line.strip() and index not in done:
                yield index, line


def count_lines(path: Path) -> int:
    """Non-blank lines (for the progress bar's total)."""
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def result_row(
    index: int, passthrough: dict[str, Any], result: Completion | None, error: MeshError | None
) -> dict[str, Any]:
    row: dict[str, Any] = {"index": index, **passthrough}
    if result is not None:
        data = result.to_dict()
        row.update(
            text=data["text"],
            finish_reason=data["finish_reason"],
            usage=data["usage"],
            timing=data["timing"],
            replica=result.replica,
            cached=result.cached,
            error=None,
        )
    else:
        assert error is not None  # a batch item has a result or an error
        row["error"] = {"code": error.code.name, "message": error.message, "reason": error.reason}
    return row


class DoneSet:
    """Input indexes already finished: a bitmap (one bit per input line, 125 kB a million)."""

    def __init__(self) -> None:
        self._bits = bytearray()
        self.count = 0

    def add(self, index: int) -> None:
        byte, bit = divmod(index, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(byte + 1 - len(self._bits)))
        if not self._bits[byte] & (1 << bit):
            self._bits[byte] |= 1 << bit
            self.count += 1

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        byte, bit = divmod(index, 8)
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << bit))


def _final(row: dict[str, Any]) -> bool:
    """A row that needs no new attempt: a whole result, or an error that would come back
    anyway. CANCELLED (an error, or a reply cut short) is the mesh's doing: the CLI's own
    cancel (Ctrl-C) never writes a row, so such a row is run again, as is a reply that an
    error cut short."""
    error = row.get("error")
    if error:
        return error.get("code") not in _RUN_AGAIN
    return row.get("finish_reason") not in _CUT_SHORT


def resume(path: Path) -> DoneSet:
    """Prepare ``path`` for appending after a crash; returns the input indexes it finished.

    Keeps complete rows that are final, drops rows to run again and a torn last line (rewritten
    to a temporary file and renamed over the output, so a crash here loses nothing), and
    refuses a file whose damage is not at its end, or that repeats an index.
    """
    done, keep_until, rewrite = DoneSet(), 0, False
    if not path.exists():
        return done
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            row = _complete_row(line)
            if row is None:
                if f.read(1):
                    raise InvalidArgument(f"{path}: line {number} is damaged and is not the last")
                break
            index = row["index"]
            if index in done:
                raise InvalidArgument(f"{path}: index {index} appears twice (line {number})")
            if _final(row):
                done.add(index)
            else:
                rewrite = True
            keep_until += len(line)
    if rewrite:
        _rewrite(path, done)
    elif keep_until < path.stat().st_size:
        os.truncate(path, keep_until)
    return done


def _complete_row(line: bytes) -> dict[str, Any] | None:
    if not line.endswith(b"\n"):
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("index"), int) else None


def _rewrite(path: Path, done: DoneSet) -> None:
    tmp = path.with_name(path.name + ".resume-tmp")
    with path.open("rb") as src, tmp.open("wb") as dst:
        for line in src:
            row = _complete_row(line)
            if row is not None and row["index"] in done and _final(row):
                dst.write(line)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)


class RowWriter:
    """Appends rows, each as one complete line in a single unbuffered write."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def write(self, row: dict[str, Any]) -> None:
        self._out.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
        self._out.flush()
