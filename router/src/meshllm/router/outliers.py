"""Outlier ejection: a replica that fails requests fast stops getting them for a while. Pure logic.

A replica whose engine fails every request (a broken CUDA context, a model that errors) still
reports READY with an empty queue, so least-busy would send it more work than any other. Each
replica keeps a sliding window of how its attempts ended; too many failures eject it for a
backoff that grows with each ejection in a row, then it is re-admitted gradually (a ramp). Its
load reports do not re-admit it: they say nothing of whether requests succeed there.

Every method takes the time (``now``) from its caller: the registry's clock.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:  # config imports placement, which imports the registry, which imports this
    from meshllm.router.config import OutlierConfig

RAMP_START = 0.1
"""The chance of being a candidate when a ramp begins; it rises linearly to 1 at its end."""

FAILURES = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
    }
)
"""Codes that say the replica failed. Others say nothing of it: the caller's mistake
(INVALID_ARGUMENT, NOT_FOUND), deadline or cancel, a full queue or quota (RESOURCE_EXHAUSTED), a
model not ready (FAILED_PRECONDITION)."""


class Outcome(enum.Enum):
    """How one attempt on a replica ended, as outlier ejection counts it."""

    SUCCESS = "success"
    """The reply's final chunk arrived."""
    FAILURE = "failure"
    """The replica failed it (:data:`FAILURES`, a transport failure, a reply cut short)."""
    NEUTRAL = "neutral"
    """Says nothing of the replica (not counted)."""


def outcome_of(code: grpc.StatusCode) -> Outcome:
    """The outcome of an attempt the replica answered with ``code``."""
    return Outcome.FAILURE if code in FAILURES else Outcome.NEUTRAL


@dataclass(frozen=True)
class Ejection:
    until: float
    """When it ends (the clock's time); the ramp follows."""
    duration_s: float
    count: int
    """Ejections in a row, this one included (a clean ramp resets the count)."""
    why: str


@dataclass(eq=False)
class OutlierRecord:
    """One replica's recent attempts and its ejection, if any (compared by identity)."""

    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    """(when, failed) of attempts that ended within the window."""
    failures: int = 0
    """Failed ones among ``outcomes``."""
    in_a_row: int = 0
    """Failures since the last success."""
    last_failure: float = float("-inf")
    ejections: int = 0
    """Ejections in a row."""
    ejection: Ejection | None = None
    """The current or last ejection, until its ramp is over."""

    def ejected(self, now: float) -> bool:
        return self.ejection is not None and now < self.ejection.until


class OutlierDetector:
    """Applies the ``[router.outliers]`` rules to each replica's :class:`OutlierRecord`
    (``enabled`` is the caller's: a router with it off has no detector)."""

    def __init__(self, config: OutlierConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()

    def record(
        self, record: OutlierRecord, outcome: Outcome, now: float, peers: Sequence[OutlierRecord]
    ) -> Ejection | None:
        """Count one attempt's ``outcome``; the ejection it caused, if any. ``peers``: the
        records of the replicas that serve the same model (outlier ejections aside)."""
        if outcome is Outcome.NEUTRAL:
            return None
        self._settle(record, now)
        if record.ejected(now):
            return None  # an attempt sent before the ejection
        failed = outcome is Outcome.FAILURE
        self._remember(record, now, failed)
        if not failed:
            return None
        why = self._why(record)
        if not why or not self._room(record, now, peers):
            return None
        return self._eject(record, now, why)

    def share(self, record: OutlierRecord, now: float) -> float:
        """The chance of being a candidate: 0 while ejected, rising from :data:`RAMP_START` to
        1 over the ramp, then 1."""
        self._settle(record, now)
        ejection = record.ejection
        if ejection is None:
            return 1.0
        if now < ejection.until:
            return 0.0
        ramped = (now - ejection.until) / self.config.ramp_s
        return RAMP_START + (1.0 - RAMP_START) * ramped

    def admits(self, record: OutlierRecord, now: float) -> bool:
        """Whether the replica is a candidate for this pick (a draw during its ramp)."""
        share = self.share(record, now)
        return share >= 1.0 or (share > 0.0 and self._rng.random() < share)

    def note(self, record: OutlierRecord, now: float) -> str:
        """The ejection or ramp as the Admin service shows it ("" when neither)."""
        share = self.share(record, now)
        ejection = record.ejection
        if ejection is None or share >= 1.0:
            return ""
        if share == 0.0:
            return (
                f"ejected as an outlier for {ejection.until - now:.1f} s more "
                f"({ejection.duration_s:g} s, ejection {ejection.count} in a row): {ejection.why}"
            )
        left = ejection.until + self.config.ramp_s - now
        return (
            f"re-admitted after an outlier ejection: a candidate for {share:.0%} of picks, "
            f"all in {left:.1f} s (ejected for: {ejection.why})"
        )

    def _settle(self, record: OutlierRecord, now: float) -> None:
        """End a ramp that is over; a clean one (no failure since the ejection) resets the
        count of ejections in a row."""
        ejection = record.ejection
        if ejection is not None and now >= ejection.until + self.config.ramp_s:
            if record.last_failure < ejection.until:
                record.ejections = 0
            record.ejection = None

    def _remember(self, record: OutlierRecord, now: float, failed: bool) -> None:
        window = record.outcomes
        window.append((now, failed))
        while window[0][0] <= now - self.config.window_s:
            record.failures -= window.popleft()[1]
        if failed:
            record.failures += 1
            record.in_a_row += 1
            record.last_failure = now
        else:
            record.in_a_row = 0

    def _why(self, record: OutlierRecord) -> str:
        """Which rule a failure just met ("" when none)."""
        c = self.config
        if record.ejection is not None:  # not ejected, so in its ramp
            return "an attempt failed during its re-admission ramp"
        if c.consecutive_failures and record.in_a_row >= c.consecutive_failures:
            return f"{record.in_a_row} attempts failed in a row"
        total = len(record.outcomes)
        if total >= c.min_requests and record.failures >= c.failure_rate * total:
            return f"{record.failures} of {total} attempts failed within {c.window_s:g} s"
        return ""

    def _room(self, record: OutlierRecord, now: float, peers: Sequence[OutlierRecord]) -> bool:
        """Ejecting it keeps within ``max_ejected_percent`` of the model's replicas (at least
        one of two or more) and leaves one of them in."""
        group = [*peers, *([] if record in peers else [record])]
        others = sum(p.ejected(now) for p in group if p is not record)
        percent = self.config.max_ejected_percent
        allowed = max(1, len(group) * percent // 100) if percent else 0
        return others + 1 <= min(allowed, len(group) - 1)

    def _eject(self, record: OutlierRecord, now: float, why: str) -> Ejection:
        record.ejections += 1
        duration = min(self.config.base_ejection_s * record.ejections, self.config.max_ejection_s)
        record.ejection = Ejection(now + duration, duration, record.ejections, why)
        record.outcomes.clear()  # the ramp starts from a clean window
        record.failures = record.in_a_row = 0
        return record.ejection
