"""Tenants' served-token counters shared by several routers through the quota store's Redis.

Each router queues its own requests, but the order it gives slots in follows counters summed
over every router: a tenant flooding through three routers is behind on all three. Every
``interval_s`` a router adds what it counted since the last time (tokens served, counters lifted)
to one hash per model (``meshllm:fair:{model}``, field = tenant, value = virtual tokens) and
reads the totals back; between two syncs its view lags the others' by at most one interval of
their traffic. Each router also writes which tenants it has active and how many requests each
runs there (``meshllm:fair-load:{model}``, field = router id and tenant), so the reserve for
tenants under their fair share (``gate``) counts every router's tenants, not just its own. When Redis cannot be reached the router goes on with its own counts, keeps what
it could not add for the next try, and logs at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from meshllm.router.fairqueue.gate import AdmissionQueue, ModelQueue

log = logging.getLogger(__name__)
_WARN_EVERY_S = 60.0


LOAD_TTL_S = 10.0
"""A router's active-tenant entry older than this is gone (its router stopped or lost Redis)."""


def key(model: str) -> str:
    return f"meshllm:fair:{{{model}}}"


def load_key(model: str) -> str:
    return f"meshllm:fair-load:{{{model}}}"


class SharedCounters:
    """Keeps an ``AdmissionQueue``'s counters equal to the totals in Redis (plus its own news)."""

    def __init__(self, redis: aioredis.Redis, queue: AdmissionQueue, interval_s: float) -> None:
        self._redis, self._queue, self._interval_s = redis, queue, interval_s
        self._task: asyncio.Task[None] | None = None
        self._warned_at = -_WARN_EVERY_S
        self.router_id = uuid.uuid4().hex[:12]

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
            now = time.time()  # wall clock: routers of one deployment are NTP-synchronised
            m.prune(self._queue.now())
            for tenant, (weight, _) in m.active.items():
                entry = json.dumps([weight, m.queue.running(tenant), now])
                pipe.hset(load_key(model), f"{self.router_id}:{tenant}", entry)
            pipe.hgetall(load_key(model))
            try:
                results = await cast(Awaitable[list[object]], pipe.execute())
            except (RedisError, OSError) as e:
                for tenant, amount in news.items():  # kept for the next try
                    m.unshared[tenant] = m.unshared.get(tenant, 0.0) + amount
                self._warn(e)
                continue
            totals = cast(dict[bytes, bytes], results[len(news)])
            for field, total in totals.items():
                name = field.decode()
                m.queue.set_served(name, float(total) + m.unshared.get(name, 0.0))
            stale = self._elsewhere(m, cast(dict[bytes, bytes], results[-1]), now)
            if stale:
                with contextlib.suppress(RedisError, OSError):
                    await cast(Awaitable[int], self._redis.hdel(load_key(model), *stale))

    def _elsewhere(self, m: ModelQueue, entries: dict[bytes, bytes], now: float) -> list[str]:
        """The other routers' active tenants into ``m.elsewhere``; returns entries gone stale."""
        elsewhere: dict[str, tuple[float, int]] = {}
        stale = []
        for field, value in entries.items():
            router, _, tenant = field.decode().partition(":")
            weight, running, at = json.loads(value)
            if now - at > LOAD_TTL_S:
                stale.append(field.decode())
            elif router != self.router_id:
                prior = elsewhere.get(tenant, (weight, 0))[1]
                elsewhere[tenant] = (float(weight), prior + int(running))
        m.elsewhere = elsewhere
        return stale

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
