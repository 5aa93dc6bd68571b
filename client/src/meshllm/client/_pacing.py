"""Client-side pacing: send no faster than the quota allows (pure: every method takes ``now``).

Two sources of limits, both token buckets:

- explicit ``requests_per_minute`` / ``tokens_per_minute`` chosen by the caller, spread evenly
  (a bucket that holds one second's worth, so a run never starts with a burst of a minute's);
- the router's quota, learned from the ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
  initial metadata of every admitted call: a mirror of the tenant's bucket on the server, reset
  to what the server reported each time a reply says so, minus what this client sent since that
  call left (those may not be counted in the report yet).

A RESOURCE_EXHAUSTED with RetryInfo pauses every sender until the server's refill time
(``pause_until``), so a batch backs off together instead of each item hammering on its own.
A request costs one request and its token estimate (prompt + max_tokens, as the router reserves);
the tokens not used are given back when the reply tells the real count (``settle``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

_PREFIX = "x-ratelimit-"
_PER_MINUTE = 60.0


@dataclass(frozen=True, kw_only=True)
class Pacing:
    """How a batch paces itself."""

    requests_per_minute: float | None = None
    """Explicit request rate (None: no explicit limit)."""
    tokens_per_minute: float | None = None
    """Explicit token rate, counting each request's prompt estimate + max_tokens."""
    follow_server: bool = True
    """Learn the router's limits from its ``x-ratelimit-*`` metadata and stay under them."""

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be positive, got {value}")


@dataclass(frozen=True)
class Limit:
    """One server limit as reported: its size, what is left, seconds until the bucket is full."""

    limit: float
    remaining: float
    reset_s: float

    @property
    def rate(self) -> float:
        """Refill per second: what the report implies, else the limit per minute."""
        if self.reset_s > 0 and self.limit > self.remaining:
            return (self.limit - self.remaining) / self.reset_s
        return self.limit / _PER_MINUTE


@dataclass(frozen=True)
class RateLimits:
    requests: Limit | None = None
    tokens: Limit | None = None


def parse_rate_limits(metadata: Iterable[tuple[str, str | bytes]] | None) -> RateLimits:
    """The router's ``x-ratelimit-*`` headers; a limit with a missing or bad value is None."""
    values: dict[str, float] = {}
    for key, value in metadata or ():
        if key.startswith(_PREFIX) and isinstance(value, str):
            try:
                values[key[len(_PREFIX) :]] = float(value)
            except ValueError:
                continue

    def limit(kind: str) -> Limit | None:
        parts = [values.get(f"{what}-{kind}") for what in ("limit", "remaining", "reset")]
        if any(p is None for p in parts):
            return None
        lim, rem, reset = (float(p or 0.0) for p in parts)
        return Limit(lim, rem, reset) if lim > 0 else None

    return RateLimits(requests=limit("requests"), tokens=limit("tokens"))


class TokenBucket:
    """A bucket of ``capacity`` refilled at ``rate`` per second. A request may take more than
    is left once the bucket holds at least ``min(cost, capacity)``: the level goes negative
    (debt), so a cost larger than the whole bucket waits for a full one instead of forever."""

    def __init__(self, capacity: float, rate: float, now: float, level: float | None = None):
        self.capacity, self.rate, self.updated = capacity, rate, now
        self.level = capacity if level is None else level

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait(self, now: float, cost: float) -> float:
        """Seconds until ``cost`` may be taken (0.0: now)."""
        self._refill(now)
        short = min(cost, self.capacity) - self.level
        if short <= 0:
            return 0.0
        return short / self.rate if self.rate > 0 else float("inf")

    def take(self, now: float, cost: float) -> None:
        self._refill(now)
        self.level -= cost

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)

    def reset(self, now: float, *, capacity: float, rate: float, level: float) -> None:
        self.capacity, self.rate, self.updated = capacity, rate, now
        self.level = min(capacity, level)


@dataclass(frozen=True)
class Ticket:
    """What one send took, and the pacer's running totals at that moment."""

    tokens: float
    requests_before: float
    tokens_before: float


class Pacer:
    """Decides when the next request may go. Single-threaded use (one event loop): the caller
    checks ``delay``, sleeps, and calls ``take`` with no await in between."""

    def __init__(self, pacing: Pacing, now: float) -> None:
        self.pacing = pacing
        self._explicit: list[tuple[TokenBucket, bool]] = []  # (bucket, counts tokens)
        if pacing.requests_per_minute is not None:
            rate = pacing.requests_per_minute / _PER_MINUTE
            self._explicit.append((TokenBucket(max(1.0, rate), rate, now), False))
        if pacing.tokens_per_minute is not None:
            rate = pacing.tokens_per_minute / _PER_MINUTE
            self._explicit.append((TokenBucket(max(1.0, rate), rate, now), True))
        self.server_requests: TokenBucket | None = None
        self.server_tokens: TokenBucket | None = None
        self.paused_until = 0.0
        self._sent_requests = 0.0
        self._sent_tokens = 0.0

    def _buckets(self) -> list[tuple[TokenBucket, bool]]:
        learned = [
            (b, t)
            for b, t in ((self.server_requests, False), (self.server_tokens, True))
            if b is not None
        ]
        return [*self._explicit, *learned]

    def delay(self, now: float, tokens: float) -> float:
        """Seconds to wait before a request estimated at ``tokens`` may go (0.0: now)."""
        waits = [b.wait(now, tokens if counts else 1.0) for b, counts in self._buckets()]
        return max([self.paused_until - now, 0.0, *waits])

    def take(self, now: float, tokens: float) -> Ticket:
        ticket = Ticket(tokens, self._sent_requests, self._sent_tokens)
        for bucket, counts in self._buckets():
            bucket.take(now, tokens if counts else 1.0)
        self._sent_requests += 1.0
        self._sent_tokens += tokens
        return ticket

    def observe(self, now: float, limits: RateLimits, ticket: Ticket) -> None:
        """A reply's ``x-ratelimit-*`` report: what the server had left when it admitted the
        call of ``ticket``, minus what this client sent after that call."""
        if not self.pacing.follow_server:
            return
        if limits.requests is not None:
            since = self._sent_requests - ticket.requests_before - 1.0
            self.server_requests = _mirror(self.server_requests, limits.requests, since, now)
        if limits.tokens is not None:
            since = self._sent_tokens - ticket.tokens_before - ticket.tokens
            self.server_tokens = _mirror(self.server_tokens, limits.tokens, since, now)

    def settle(self, ticket: Ticket, used_tokens: float) -> None:
        """The reply used ``used_tokens``: the rest of its reservation comes back, as on the
        server."""
        unused = max(0.0, ticket.tokens - used_tokens)
        for bucket, counts in self._buckets():
            if counts:
                bucket.give(unused)

    def pause_until(self, until: float) -> None:
        """No request goes before ``until`` (the server's RetryInfo of a quota refusal)."""
        self.paused_until = max(self.paused_until, until)


def _mirror(bucket: TokenBucket | None, limit: Limit, since: float, now: float) -> TokenBucket:
    level = limit.remaining - max(0.0, since)
    if bucket is None:
        return TokenBucket(limit.limit, limit.rate, now, level=level)
    bucket.reset(now, capacity=limit.limit, rate=limit.rate, level=level)
    return bucket
