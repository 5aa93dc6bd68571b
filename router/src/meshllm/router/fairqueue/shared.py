"""Tenants' served-token counters shared by several routers through the quota store's Redis.

Each router queues its own requests, but the order it gives slots in follows counters summed
over every router: a tenant flooding through three routers is behind on all three. Every
``interval_s`` a router adds what it counted since the last time (tokens served, counters lifted)
to one hash per model (``meshllm:fair:{model}``, field = tenant, value = virtual tokens) and
reads the totals back; between two syncs its view lags the others' by at most one interval of
their traffic. When Redis cannot be reached the router goes on with its own counts, keeps what
it could not add for the next try, and logs at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from meshllm.router.fairqueue.gate import AdmissionQueue

log = logging.getLogger(__name__)
_WARN_EVERY_S = 60.0


def key(model: str) -> str:
    return f"meshllm:fair:{{{model}}}"


class SharedCounters:
    """Keeps an ``AdmissionQueue``'s counters equal to the totals in Redis (plus its own news)."""

    def __init__(self, redis: aioredis.Redis, queue: AdmissionQueue, interval_s: float) -> None:
        self._redis, self._queue, self._interval_s = redis, queue, interval_s
        self._task: asyncio.Task[None] | None = None
        self._warned_at = -_WARN_EVERY_S

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fair-share counters")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.sync()

    async def sync(self) -> None:
        """Add this router's news to the shared totals and take the totals as its counters."""
        for model, m in list(self._queue.models.items()):
            news, m.unshared = m.unshared, {}
            pipe = self._redis.pipeline(transaction=False)
            for tenant, amount in news.items():
                pipe.hincrbyfloat(key(model), tenant, amount)
            pipe.hgetall(key(model))
            try:
                results = await cast(Awaitable[list[object]], pipe.execute())
            except (RedisError, OSError) as e:
                for tenant, amount in news.items():  # kept for the next try
                    m.unshared[tenant] = m.unshared.get(tenant, 0.0) + amount
                self._warn(e)
                continue
            totals = cast(dict[bytes, bytes], results[-1])
            for field, total in totals.items():
                name = field.decode()
                m.queue.set_served(name, float(total) + m.unshared.get(name, 0.0))

    def _warn(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "cannot share fair-queue counters through Redis (%s); this router orders its "
                "queue by its own counts until Redis answers",
                error,
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
