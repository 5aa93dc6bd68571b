"""The quota arithmetic, pure and clock-injected: token buckets per minute, a counter per UTC day,
a set of concurrent-request leases. The in-memory store runs it directly; the Redis store's Lua
scripts (``reserve.lua``, ``settle.lua``) are the same steps, and a test holds the two to the
same results."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from meshllm.api.types import QuotaUsage
from meshllm.router.quota.limits import (
    CONCURRENT_REQUESTS,
    DAY_S,
    MINUTE_S,
    REQUESTS_PER_MINUTE,
    TOKENS_PER_DAY,
    TOKENS_PER_MINUTE,
    Demand,
    Remaining,
    Reservation,
    TenantLimits,
    Violation,
)


@dataclass
class Bucket:
    """Holds up to ``capacity``; refills ``capacity`` per minute, continuously. A settle that
    charges more than was reserved may take the level below zero: a debt paid by waiting."""

    level: float
    updated: float

    @staticmethod
    def at(bucket: Bucket | None, capacity: int, now: float) -> Bucket:
        """The bucket's state at ``now`` (a new bucket starts full)."""
        if bucket is None:
            return Bucket(float(capacity), now)
        elapsed = max(0.0, now - bucket.updated)  # another router's clock may lag a little
        level = min(float(capacity), bucket.level + elapsed * capacity / MINUTE_S)
        return Bucket(level, max(bucket.updated, now))

    def wait_s(self, amount: float, capacity: int) -> float:
        """Seconds until the level reaches ``amount``."""
        return max(0.0, (amount - self.level) * MINUTE_S / capacity)


def day_of(now: float) -> int:
    """The UTC day number of a wall-clock time."""
    return math.floor(now / DAY_S)


def until_next_day(now: float) -> float:
    return (day_of(now) + 1) * DAY_S - now


@dataclass
class TenantLedger:
    """One tenant's quota state."""

    requests: Bucket | None = None
    tokens: Bucket | None = None
    day: int = -1
    day_tokens: int = 0
    leases: set[str] = field(default_factory=set)

    def roll(self, now: float) -> None:
        if day_of(now) != self.day:
            self.day, self.day_tokens = day_of(now), 0


def check(
    ledger: TenantLedger,
    limits: TenantLimits,
    demand: Demand,
    now: float,
    concurrency_retry_s: float,
) -> list[Violation]:
    """Every limit ``demand`` does not fit now (empty: it may be admitted). Changes nothing
    but the refill of the buckets."""
    ledger.roll(now)
    out: list[Violation] = []
    if (cap := limits.requests_per_minute) is not None:
        ledger.requests = Bucket.at(ledger.requests, cap, now)
        if ledger.requests.level < demand.requests:
            retry = ledger.requests.wait_s(demand.requests, cap)
            out.append(violation(REQUESTS_PER_MINUTE, cap, demand, retry))
    if (cap := limits.tokens_per_minute) is not None:
        ledger.tokens = Bucket.at(ledger.tokens, cap, now)
        left = max(0, math.floor(ledger.tokens.level))
        if demand.tokens > cap:
            out.append(violation(TOKENS_PER_MINUTE, cap, demand, None))
        elif ledger.tokens.level < demand.tokens:
            retry = ledger.tokens.wait_s(demand.tokens, cap)
            out.append(violation(TOKENS_PER_MINUTE, cap, demand, retry, tokens_left=left))
    if (cap := limits.concurrent_requests) is not None and len(ledger.leases) >= cap:
        out.append(violation(CONCURRENT_REQUESTS, cap, demand, concurrency_retry_s))
    if (cap := limits.tokens_per_day) is not None:
        if demand.tokens > cap:
            out.append(violation(TOKENS_PER_DAY, cap, demand, None))
        elif ledger.day_tokens + demand.tokens > cap:
            out.append(violation(TOKENS_PER_DAY, cap, demand, until_next_day(now)))
    return out


def violation(
    limit: str,
    cap: int,
    demand: Demand,
    retry_after_s: float | None,
    tokens_left: int | None = None,
) -> Violation:
    """One refused limit, worded the same whichever store found it (None: it never fits)."""
    unit = "day" if limit == TOKENS_PER_DAY else "minute"
    if retry_after_s is None:
        message = f"the request reserves {demand.tokens} tokens; the limit is {cap} per {unit}"
    elif limit == REQUESTS_PER_MINUTE:
        message = f"{cap} requests per minute used up"
    elif limit == CONCURRENT_REQUESTS:
        message = f"{cap} concurrent requests already running"
    elif limit == TOKENS_PER_DAY:
        message = f"{cap} tokens per day used up (resets at 00:00 UTC)"
    elif tokens_left is not None:
        message = f"{demand.tokens} tokens needed, {tokens_left} of {cap} per minute left"
    else:
        message = f"{demand.tokens} tokens needed, more than is left of {cap} per minute"
    return Violation(limit, cap, retry_after_s, message)


def reserve(ledger: TenantLedger, limits: TenantLimits, demand: Demand, lease: str) -> Remaining:
    """Take ``demand`` (after ``check`` found it fits) and say what is left."""
    if limits.requests_per_minute is not None and ledger.requests is not None:
        ledger.requests.level -= demand.requests
    if limits.tokens_per_minute is not None and ledger.tokens is not None:
        ledger.tokens.level -= demand.tokens
    ledger.day_tokens += demand.tokens
    ledger.leases.add(lease)
    return remaining(ledger, limits)


def remaining(ledger: TenantLedger, limits: TenantLimits) -> Remaining:
    """The per-minute buckets' levels as response headers (whole units left, seconds to full)."""
    out = Remaining()
    if (cap := limits.requests_per_minute) is not None and ledger.requests is not None:
        level = ledger.requests.level
        out = replace(
            out,
            limit_requests=cap,
            remaining_requests=max(0, math.floor(level)),
            reset_requests_s=ledger.requests.wait_s(cap, cap),
        )
    if (cap := limits.tokens_per_minute) is not None and ledger.tokens is not None:
        level = ledger.tokens.level
        out = replace(
            out,
            limit_tokens=cap,
            remaining_tokens=max(0, math.floor(level)),
            reset_tokens_s=ledger.tokens.wait_s(cap, cap),
        )
    return out


def settle(ledger: TenantLedger, reservation: Reservation, used_tokens: int, now: float) -> None:
    """End a reservation: free its slot and give back what it reserved beyond ``used_tokens``
    (or charge the excess). A past day's count stays as it was. Once only: settling a lease
    again changes nothing (a settle sent again after a timeout)."""
    if reservation.lease not in ledger.leases:
        return
    refund = reservation.tokens - used_tokens
    ledger.leases.discard(reservation.lease)
    if (cap := reservation.limits.tokens_per_minute) is not None:
        ledger.tokens = Bucket.at(ledger.tokens, cap, now)
        ledger.tokens.level = min(float(cap), ledger.tokens.level + refund)
    ledger.roll(now)
    if reservation.day == ledger.day:
        ledger.day_tokens = max(0, ledger.day_tokens - refund)


def usage(ledger: TenantLedger, tenant: str, limits: TenantLimits, now: float) -> list[QuotaUsage]:
    """Each set limit of the tenant: used, limit and seconds until it is whole again."""
    ledger.roll(now)
    out: list[QuotaUsage] = []
    for name, cap, bucket in (
        (REQUESTS_PER_MINUTE, limits.requests_per_minute, ledger.requests),
        (TOKENS_PER_MINUTE, limits.tokens_per_minute, ledger.tokens),
    ):
        if cap is not None:
            b = Bucket.at(bucket, cap, now)
            out.append(
                QuotaUsage(
                    tenant=tenant,
                    limit=name,
                    used=max(0, math.ceil(cap - b.level)),
                    limit_value=cap,
                    resets_in_s=b.wait_s(cap, cap),
                )
            )
    if (cap := limits.concurrent_requests) is not None:
        out.append(
            QuotaUsage(
                tenant=tenant,
                limit=CONCURRENT_REQUESTS,
                used=len(ledger.leases),
                limit_value=cap,
                resets_in_s=0.0,
            )
        )
    if (cap := limits.tokens_per_day) is not None:
        out.append(
            QuotaUsage(
                tenant=tenant,
                limit=TOKENS_PER_DAY,
                used=ledger.day_tokens,
                limit_value=cap,
                resets_in_s=until_next_day(now),
            )
        )
    return out
