"""Where routers keep each model's desired replica count once an admin changed it.

One router keeps it in memory. Routers with ``placement.share_counts`` keep it in Redis too, so that a scale-down through one router is not undone by the others' placement, and a
restarted router keeps it. An admin's count lasts until the catalog's ``desired_replicas`` for
that model changes: a new catalog is a newer decision than an old admin call.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable
from typing import Protocol, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from meshllm.router.placement.catalog import CatalogModel
from meshllm.router.quota.redis_store import connect

log = logging.getLogger(__name__)
KEY = "meshllm:placement:desired"


class DesiredCounts(Protocol):
    async def read(self) -> dict[str, tuple[int, int]]:
        """model -> (the admin's count, the catalog's count when it was set)."""
        ...

    async def write(self, model: str, count: int, catalog_count: int) -> None: ...

    async def close(self) -> None: ...


def current(catalog: dict[str, CatalogModel], stored: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Desired counts: an admin's where the catalog has not changed since, else the catalog's."""
    out = {}
    for model, entry in catalog.items():
        count, set_against = stored.get(model, (entry.desired_replicas, entry.desired_replicas))
        out[model] = count if set_against == entry.desired_replicas else entry.desired_replicas
    return out


class LocalCounts:
    """This router's memory only."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, int]] = {}

    async def read(self) -> dict[str, tuple[int, int]]:
        return dict(self._counts)

    async def write(self, model: str, count: int, catalog_count: int) -> None:
        self._counts[model] = (count, catalog_count)

    async def close(self) -> None:
        pass


class RedisCounts:
    """A Redis hash shared by every router; when Redis cannot be reached, this router goes on
    with its own view (logged at most once a minute). It borrows the quota store's client:
    one connection pool per router, closed by its owner (``connect`` makes one of its own)."""

    def __init__(self, redis: aioredis.Redis, *, owned: bool = False) -> None:
        self._redis, self._owned = redis, owned
        self._local = LocalCounts()
        self._warned_at = 0.0

    @classmethod
    def connect(cls, url: str, timeout_s: float) -> RedisCounts:
        """With a client of its own (the quota store does not use Redis)."""
        return cls(connect(url, timeout_s), owned=True)

    async def read(self) -> dict[str, tuple[int, int]]:
        try:
            raw = await cast(Awaitable[dict[bytes, bytes]], self._redis.hgetall(KEY))
        except (RedisError, OSError) as e:
            self._warn(f"cannot read desired replica counts from Redis: {e}; using this router's")
            return await self._local.read()
        counts = {}
        for model, value in raw.items():
            with_catalog = json.loads(value)
            counts[model.decode()] = (int(with_catalog[0]), int(with_catalog[1]))
        return counts

    async def write(self, model: str, count: int, catalog_count: int) -> None:
        await self._local.write(model, count, catalog_count)
        try:
            await cast(
                Awaitable[int], self._redis.hset(KEY, model, json.dumps([count, catalog_count]))
            )
        except (RedisError, OSError) as e:
            log.error(
                "cannot store the desired count of %s in Redis: %s; other routers keep "
                "theirs and may place it again",
                model,
                e,
            )

    def _warn(self, message: str) -> None:
        if time.monotonic() - self._warned_at >= 60.0:
            self._warned_at = time.monotonic()
            log.error(message)

    async def close(self) -> None:
        if self._owned:
            await self._redis.aclose()
