"""Quota state in Redis, shared by every router that points at it: one global limit per tenant.

Each admission and each settle is one Lua script (``reserve.lua``, ``settle.lua``), so routers
never interleave inside a tenant's update. The time comes from the calling router's wall clock:
routers of one deployment are NTP-synchronised, and a clock a little behind never makes a
bucket refill backwards (the scripts keep the latest time a bucket saw).
"""

from __future__ import annotations

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
        return Reservation(
            tenant=tenant,
            tokens=demand.tokens,
            day=day,
            lease=lease,
            limits=limits,
            remaining=_remaining(limits, values[1], values[2]),
        )

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
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

    async def ping(self) -> None:
        async def ping() -> None:
            await cast(Awaitable[bool], self.redis.ping())  # typed sync-or-async in redis-py

        await self._call(ping)

    async def close(self) -> None:
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
