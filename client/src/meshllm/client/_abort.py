"""When a batch gives up: a run that keeps failing stops instead of failing a million items one
by one (pure: fed one final outcome at a time, after retries)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class AbortPolicy:
    """Stop a batch early. Items not finished then end with ``Aborted`` (reason BATCH_ABORTED).

    Only final outcomes count: an item that succeeded after retries is a success.
    """

    max_consecutive_failures: int | None = None
    """Abort after this many failed items in a row (None: never)."""
    max_failure_ratio: float | None = None
    """Abort once failed / finished items exceeds this, after ``min_items`` finished."""
    min_items: int = 100
    """Finished items before ``max_failure_ratio`` is judged (a ratio of 3 items means little)."""

    def __post_init__(self) -> None:
        if self.max_consecutive_failures is not None and self.max_consecutive_failures < 1:
            raise ValueError("max_consecutive_failures: need at least 1")
        if self.max_failure_ratio is not None and not 0.0 <= self.max_failure_ratio < 1.0:
            raise ValueError("max_failure_ratio: must be within [0, 1)")
        if self.min_items < 1:
            raise ValueError("min_items: need at least 1")


NEVER = AbortPolicy()


class FailureTracker:
    """Counts final outcomes; ``record`` says why to abort, once a threshold is crossed."""

    def __init__(self, policy: AbortPolicy) -> None:
        self.policy = policy
        self.finished = 0
        self.failed = 0
        self.consecutive = 0

    def record(self, ok: bool) -> str | None:
        """Add one outcome; the reason to abort now, or None to go on."""
        self.finished += 1
        if ok:
            self.consecutive = 0
            return None
        self.failed += 1
        self.consecutive += 1
        p = self.policy
        if (
            p.max_consecutive_failures is not None
            and self.consecutive >= p.max_consecutive_failures
        ):
            return f"{self.consecutive} items in a row failed"
        if (
            p.max_failure_ratio is not None
            and self.finished >= p.min_items
            and self.failed / self.finished > p.max_failure_ratio
        ):
            return (
                f"{self.failed} of {self.finished} items failed "
                f"(more than {p.max_failure_ratio:.0%})"
            )
        return None
