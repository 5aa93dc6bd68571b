"""An optional response cache in SQLite, for deterministic requests only.

Only greedy requests are cached: ``temperature`` 0 or ``top_k`` 1, set explicitly. A request
that leaves temperature unset samples at temperature 1 on the replica, so two calls may differ
and none is cached. The key is a SHA-256 of the canonical request: the model and every field
that changes the output (prompt or messages or token ids, instructions, sampling, stop), sorted;
fields that do not (request_id, priority, stream options) are left out.

Reads and writes are short SQLite statements on the caller's thread (WAL, no fsync per write):
microseconds, next to a generation's milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from meshllm.client._types import Completion

_SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    completion TEXT NOT NULL,
    stored_at REAL NOT NULL
)"""


def cache_key(canonical: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical request (sorted keys, compact JSON)."""
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    """``ResponseCache(path)``; ``refresh=True`` never reads (every request goes to the server)
    but still stores, replacing what was there: a forced refresh of the cached answers."""

    def __init__(self, path: str | os.PathLike[str], *, refresh: bool = False) -> None:
        self.path, self.refresh = os.fspath(path), refresh
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self.hits = self.misses = 0

    def get(self, key: str) -> Completion | None:
        if self.refresh:
            return None
        row = self._db.execute("SELECT completion FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return replace(Completion.from_dict(json.loads(row[0])), cached=True)

    def put(self, key: str, completion: Completion) -> None:
        data = completion.to_dict()
        data.pop("cached", None)
        self._db.execute(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?)",
            (key, json.dumps(data, ensure_ascii=False), time.time()),
        )

    def __len__(self) -> int:
        count: int = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        return count

    def close(self) -> None:
        self._db.close()
