"""The numbers of ``meshllm bench`` (pure): one level's summary and the recommended concurrency."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One request of a level: client-side seconds and the tokens it got."""

    latency_s: float
    ttft_s: float
    tokens: int


@dataclass(frozen=True, kw_only=True)
class Level:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    latency_ms: dict[str, float]
    """p50, p95, p99 of send to last chunk."""
    ttft_ms: dict[str, float]
    """p50, p95, p99 of send to the first chunk with tokens."""


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 1]; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {f"p{round(q * 100)}": round(percentile(values, q) * 1e3, 2) for q in (0.5, 0.95, 0.99)}


def summarize(concurrency: int, samples: Sequence[Sample], errors: int, seconds: float) -> Level:
    return Level(
        concurrency=concurrency,
        requests=len(samples),
        errors=errors,
        seconds=round(seconds, 3),
        requests_per_s=round(len(samples) / seconds, 2) if seconds > 0 else 0.0,
        tokens_per_s=round(sum(s.tokens for s in samples) / seconds, 1) if seconds > 0 else 0.0,
        latency_ms=_spread([s.latency_s for s in samples]),
        ttft_ms=_spread([s.ttft_s for s in samples]),
    )


def recommend(
    levels: Sequence[Level], *, share_of_peak: float = 0.95, max_p99_ms: float | None = None
) -> Level | None:
    """The lowest concurrency whose tokens/s reach ``share_of_peak`` of the best level's,
    among levels without errors whose p99 latency stays within ``max_p99_ms`` (if given).
    More concurrency past that point only lengthens queues. None when no level qualifies."""
    fit = [
        lv
        for lv in levels
        if lv.errors == 0
        and lv.requests > 0
        and (max_p99_ms is None or lv.latency_ms["p99"] <= max_p99_ms)
    ]
    if not fit:
        return None
    peak = max(lv.tokens_per_s for lv in fit)
    return min(
        (lv for lv in fit if lv.tokens_per_s >= share_of_peak * peak), key=lambda lv: lv.concurrency
    )
