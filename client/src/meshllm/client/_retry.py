"""Which failures a batch retries, and how long it waits first (pure: the caller sleeps).

Retried (transient): UNAVAILABLE (no healthy replica, a replica that died, a stream that broke
before the client saw anything), RESOURCE_EXHAUSTED (quota, full queue) and DEADLINE_EXCEEDED
(``retry_deadline``). Never retried: a caller's mistake (INVALID_ARGUMENT, NOT_FOUND,
PERMISSION_DENIED, UNAUTHENTICATED), FAILED_PRECONDITION, CANCELLED, INTERNAL, and anything once a
stream has handed tokens to the caller: a second attempt would repeat text already shown.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from meshllm.api.errors import MeshError

TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)
"""Codes that may succeed later, unchanged. ABORTED is a batch stopped by its abort threshold."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a batch retries one item's transient failures."""

    max_attempts: int = 6
    """Calls per item, the first included (1: never retry)."""
    initial_backoff_s: float = 0.2
    """Backoff before the first retry; doubles (``multiplier``) for each one after it."""
    multiplier: float = 2.0
    max_backoff_s: float = 30.0
    """Cap of the exponential backoff (the server's RetryInfo may ask for longer)."""
    jitter: float = 1.0
    """Fraction of the backoff drawn at random: 1.0 is "full jitter" (uniform in [0, backoff]),
    0.0 none. Spreads the retries of many items that failed together."""
    max_retry_after_s: float = 300.0
    """A server that asks to wait longer than this (a daily quota spent) fails the item now
    instead: a batch never sleeps for hours."""
    retry_deadline: bool = True
    """Retry DEADLINE_EXCEEDED. Safe for generation, which changes nothing on the server, but
    each retry may spend quota again, so it can be turned off."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: need at least 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("backoff and retry-after limits must not be negative")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter: must be within [0, 1], got {self.jitter}")
        if self.multiplier < 1.0:
            raise ValueError(f"multiplier: must be at least 1, got {self.multiplier}")


NO_RETRY = RetryPolicy(max_attempts=1)


def is_transient(error: MeshError, *, streamed: bool = False, retry_deadline: bool = True) -> bool:
    """Whether the same request may succeed if sent again.

    ``streamed``: the caller already received tokens of this reply (a stream): never retried.
    A unary call's STREAM_INTERRUPTED (the router lost its replica mid-reply) is retried: the
    client saw nothing of it.
    """
    if streamed or error.code not in TRANSIENT:
        return False
    return retry_deadline or error.code != grpc.StatusCode.DEADLINE_EXCEEDED


def pauses_everyone(error: MeshError) -> bool:
    """Whether the server's RetryInfo holds for every request of the batch, not just this one:
    an empty rate bucket, a full queue or no replica refuses the next request too. A refusal
    for the tenant's concurrent requests alone does not: the others running are what fills it,
    and stopping them all would only idle the slots."""
    if error.retry_after is None:
        return False
    return error.metadata.get("limits") != "concurrent_requests"


def backoff(policy: RetryPolicy, attempt: int, rng: random.Random) -> float:
    """Exponential backoff with jitter after failed attempt number ``attempt`` (1-based)."""
    base = min(policy.max_backoff_s, policy.initial_backoff_s * policy.multiplier ** (attempt - 1))
    return base * (1.0 - policy.jitter) + base * policy.jitter * rng.random()


def retry_delay(
    policy: RetryPolicy,
    error: MeshError,
    attempt: int,
    rng: random.Random,
    *,
    streamed: bool = False,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or None when the item fails now.

    The wait is the jittered backoff, but never less than the server's RetryInfo
    (``error.retry_after``: the real time until quota refills or a replica may be back).
    """
    if attempt >= policy.max_attempts:
        return None
    if not is_transient(error, streamed=streamed, retry_deadline=policy.retry_deadline):
        return None
    server = error.retry_after
    if server is not None and server > policy.max_retry_after_s:
        return None
    delay = backoff(policy, attempt, rng)
    if server is not None:
        # At least what the server asked, plus a little jitter so items that were refused
        # together do not all come back in the same millisecond.
        delay = max(delay, server + server * 0.1 * policy.jitter * rng.random())
    return delay
