"""What a tenant may use and what one request asks for: plain values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

REQUESTS_PER_MINUTE = "requests_per_minute"
TOKENS_PER_MINUTE = "tokens_per_minute"
CONCURRENT_REQUESTS = "concurrent_requests"
TOKENS_PER_DAY = "tokens_per_day"
LIMITS = (REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE, CONCURRENT_REQUESTS, TOKENS_PER_DAY)
MINUTE_S = 60.0
DAY_S = 86_400.0


@dataclass(frozen=True, kw_only=True)
class TenantLimits:
    """One tenant's limits; None means unlimited.

    The per-minute limits are token buckets that hold a minute's worth and refill continuously
    (a tenant may burst its whole minute at once, then gets ``limit / 60`` per second); the daily
    limit is a counter per UTC day.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    """Prompt plus completion tokens. Reserved at admission (prompt estimate + max_tokens),
    settled with the real count when the request ends."""
    concurrent_requests: int | None = None
    tokens_per_day: int | None = None

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, name) is None for name in LIMITS)


@dataclass(frozen=True)
class Demand:
    """What admitting one request takes: one request and its reserved tokens."""

    tokens: int
    requests: int = 1


@dataclass(frozen=True)
class Violation:
    """A limit the request does not fit. ``retry_after_s`` is the real time until it would;
    None when it never will (the request alone needs more than the limit)."""

    limit: str
    limit_value: int
    retry_after_s: float | None
    message: str


@dataclass(frozen=True, kw_only=True)
class Remaining:
    """What a tenant has left after an admission: the ``x-ratelimit-*`` response headers."""

    limit_requests: int | None = None
    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    """Seconds until the request bucket is full again."""
    limit_tokens: int | None = None
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0

    def headers(self) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        if self.limit_requests is not None:
            out += [
                ("x-ratelimit-limit-requests", str(self.limit_requests)),
                ("x-ratelimit-remaining-requests", str(self.remaining_requests)),
                ("x-ratelimit-reset-requests", f"{self.reset_requests_s:.3f}"),
            ]
        if self.limit_tokens is not None:
            out += [
                ("x-ratelimit-limit-tokens", str(self.limit_tokens)),
                ("x-ratelimit-remaining-tokens", str(self.remaining_tokens)),
                ("x-ratelimit-reset-tokens", f"{self.reset_tokens_s:.3f}"),
            ]
        return tuple(out)


@dataclass(frozen=True, kw_only=True)
class Reservation:
    """An admitted request's hold on its tenant's quota, given back (settled) when it ends."""

    tenant: str
    tokens: int
    """Tokens reserved at admission; settling charges the real count instead."""
    day: int
    """UTC day number the tokens were counted against."""
    lease: str
    """Identifies the concurrent-request slot."""
    limits: TenantLimits
    remaining: Remaining
