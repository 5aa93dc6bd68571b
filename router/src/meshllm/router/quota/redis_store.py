"""Quota state in Redis, shared by every router that points at it: one global limit per tenant.

Each admission and each settle is one Lua script (``reserve.lua``, ``settle.lua``), so routers
never interleave inside a tenant's update. The time comes from the calling router's wall clock:
routers of one deployment are NTP-synchronised, and a clock a little behind never makes a
bucket refill backwards (the scripts keep the latest time a bucket saw).

Redis may be unreachable for a while (a restart, a freeze, a network blip). A settle that fails
then is kept and sent again until Redis answers (settling is idempotent: a lease settles once),
so the tenant's concurrency slots free seconds after Redis is back, not when the leases expire.
The leases of requests still running are renewed every third of ``lease_s``, so a short lease
still covers a long request, and the slots of a router that died free within ``lease_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from meshllm.api.types import QuotaUsage
from meshllm.router.quota import ledger
from meshllm.router.quota.limits import (
    Demand,
    Remaining,
    Reservation,
    TenantLimits,
    Violation,
)
from meshllm.router.quota.store import QuotaExceeded, QuotaStoreUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_UNSETTLED = 100_000
"""Failed settles kept for a retry; past this the oldest are dropped (their leases expire)."""
_RETRY_S = 0.25  # how soon a failed settle is sent again, doubling up to a third of lease_s
_SCRIPTS = resources.files("meshllm.router.quota")


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, timeout_s: float) -> aioredis.Redis:
    """A client whose every call gives up after ``timeout_s`` (then the router's policy decides)."""
    return aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
    )


def _limit(value: int | None) -> int:
    return -1 if value is None else value


class RedisQuotaStore:
    """Keys ``meshllm:quota:{tenant}:...`` (the braces keep one tenant's keys in one cluster slot)."""

    def __init__(
        self,
        url: str,
        *,
        concurrency_retry_s: float,
        lease_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = redacted(url)
        self.redis = connect(url, timeout_s)
        """The client (and its connection pool), which other router state stored in Redis
        borrows; closed with this store."""
        self._reserve = self.redis.register_script(_SCRIPTS.joinpath("reserve.lua").read_text())
        self._settle = self.redis.register_script(_SCRIPTS.joinpath("settle.lua").read_text())
        self._retry_s, self._lease_s, self._clock = concurrency_retry_s, lease_s, clock
        self._live: dict[str, str] = {}
        """Leases of requests running now -> their zset: renewed until they settle."""
        self._unsettled: dict[str, tuple[Reservation, int]] = {}
        """Settles Redis did not take (lease -> reservation, tokens used), oldest first."""
        self._keeper: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    @staticmethod
    def _keys(tenant: str, day: int) -> tuple[str, str, str, str]:
        base = f"meshllm:quota:{{{tenant}}}"
        return f"{base}:rpm", f"{base}:tpm", f"{base}:leases", f"{base}:day:{day}"

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (RedisError, OSError, TimeoutError) as e:
            raise QuotaStoreUnavailable(f"redis at {self.url}: {type(e).__name__}: {e}") from e

    async def reserve(self, tenant: str, limits: TenantLimits, demand: Demand) -> Reservation:
        try:
            return await self._reserve_once(tenant, limits, demand)
        except QuotaExceeded:
            # This router may hold the tenant's slots itself, in settles Redis has not taken yet:
            # send them now rather than refuse for slots that are free.
            if not any(r.tenant == tenant for r, _ in self._unsettled.values()):
                raise
            await self._flush()
            return await self._reserve_once(tenant, limits, demand)

    async def _reserve_once(self, tenant: str, limits: TenantLimits, demand: Demand) -> Reservation:
        now = self._clock()
        day, lease = ledger.day_of(now), uuid.uuid4().hex
        args: list[str | int | float] = [
            now,
            _limit(limits.requests_per_minute),
            _limit(limits.tokens_per_minute),
            _limit(limits.concurrent_requests),
            _limit(limits.tokens_per_day),
            demand.tokens,
            lease,
            now + self._lease_s,
            ledger.until_next_day(now),
            self._retry_s,
        ]
        reply: list[Any] = await self._call(
            lambda: self._reserve(keys=self._keys(tenant, day), args=args)
        )
        values = [v.decode() if isinstance(v, bytes) else v for v in reply]
        if values[0] != 1:
            raise QuotaExceeded(tenant, _violations(limits, demand, values[1:]))
        self._live[lease] = self._keys(tenant, day)[2]
        self._keep()
        return Reservation(
            tenant=tenant,
            tokens=demand.tokens,
            day=day,
            lease=lease,
            limits=limits,
            remaining=_remaining(limits, values[1], values[2]),
        )

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Raises QuotaStoreUnavailable when Redis did not take it; it is then sent again until
        Redis does (the caller need not)."""
        self._live.pop(reservation.lease, None)
        try:
            await self._settle_once(reservation, used_tokens)
        except QuotaStoreUnavailable:
            self._defer(reservation, used_tokens)
            raise

    def _defer(self, reservation: Reservation, used_tokens: int) -> None:
        self._unsettled[reservation.lease] = (reservation, used_tokens)
        while len(self._unsettled) > MAX_UNSETTLED:
            oldest = next(iter(self._unsettled))
            del self._unsettled[oldest]
            log.error("more than %d settles waiting for redis: dropped the oldest", MAX_UNSETTLED)
        self._keep()

    async def _settle_once(self, reservation: Reservation, used_tokens: int) -> None:
        now = self._clock()
        _, tpm, leases, day_key = self._keys(reservation.tenant, reservation.day)
        today = "1" if ledger.day_of(now) == reservation.day else "0"
        args: list[str | int | float] = [
            now,
            _limit(reservation.limits.tokens_per_minute),
            reservation.tokens - used_tokens,
            reservation.lease,
            today,
        ]
        await self._call(lambda: self._settle(keys=(tpm, leases, day_key), args=args))

    async def usage(self, tenant: str, limits: TenantLimits) -> list[QuotaUsage]:
        now = self._clock()
        rpm, tpm, leases, day_key = self._keys(tenant, ledger.day_of(now))

        async def read() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hmget(rpm, ["level", "updated"])
                pipe.hmget(tpm, ["level", "updated"])
                pipe.zcount(leases, f"({now}", "+inf")
                pipe.get(day_key)
                return list(await pipe.execute())

        requests, tokens, running, day_tokens = await self._call(read)
        book = ledger.TenantLedger(
            requests=_bucket(requests),
            tokens=_bucket(tokens),
            day=ledger.day_of(now),
            day_tokens=int(day_tokens or 0),
            leases={str(i) for i in range(int(running))},
        )
        return ledger.usage(book, tenant, limits, now)

    async def _flush(self) -> None:
        """Send the settles Redis did not take, oldest first; stop at the first failure."""
        async with self._flushing:
            while self._unsettled:
                lease, (reservation, used) = next(iter(self._unsettled.items()))
                try:
                    await self._settle_once(reservation, used)
                except QuotaStoreUnavailable:
                    return
                self._unsettled.pop(lease, None)

    async def _renew(self) -> None:
        """Push the expiry of every running request's lease ``lease_s`` ahead."""
        if not self._live:
            return
        expiry = self._clock() + self._lease_s
        ttl = math.ceil(self._lease_s) + 60

        async def renew() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                for lease, key in list(self._live.items()):
                    pipe.zadd(key, {lease: expiry}, xx=True)
                for key in set(self._live.values()):
                    pipe.expire(key, ttl, gt=True)
                await pipe.execute()

        with contextlib.suppress(QuotaStoreUnavailable):  # the next round tries again
            await self._call(renew)

    def _keep(self) -> None:
        """Start the task that retries settles and renews leases (needs the running loop)."""
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_leases(), name="quota leases")

    async def _keep_leases(self) -> None:
        period = self._lease_s / 3
        backoff, renewed = _RETRY_S, time.monotonic()
        while self._live or self._unsettled:
            await asyncio.sleep(min(backoff, period) if self._unsettled else period)
            if self._unsettled:
                await self._flush()
                backoff = _RETRY_S if not self._unsettled else backoff * 2
            if time.monotonic() - renewed >= period * 0.99:
                await self._renew()
                renewed = time.monotonic()

    async def ping(self) -> None:
        async def ping() -> None:
            await cast(Awaitable[bool], self.redis.ping())  # typed sync-or-async in redis-py

        await self._call(ping)

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        await self._flush()  # a last try; what Redis does not take now frees when leases expire
        await self.redis.aclose()


def _bucket(fields: list[bytes | None]) -> ledger.Bucket | None:
    level, updated = fields
    return None if level is None or updated is None else ledger.Bucket(float(level), float(updated))


def _violations(limits: TenantLimits, demand: Demand, flat: list[str]) -> list[Violation]:
    """The script's (limit, retry) pairs as the violations ledger.check would give."""
    return [
        ledger.violation(name, getattr(limits, name), demand, None if retry == "" else float(retry))
        for name, retry in zip(flat[::2], flat[1::2], strict=True)
    ]


def _remaining(limits: TenantLimits, requests_level: str, tokens_level: str) -> Remaining:
    """The same headers ledger.reserve gives, from the levels the script left."""
    book = ledger.TenantLedger(
        requests=ledger.Bucket(float(requests_level), 0.0) if requests_level else None,
        tokens=ledger.Bucket(float(tokens_level), 0.0) if tokens_level else None,
    )
    return ledger.remaining(book, limits)
