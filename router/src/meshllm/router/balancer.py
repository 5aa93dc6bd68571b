"""Choosing a replica: least-busy (the default) and round-robin (for comparison). Pure logic."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from meshllm.router.registry import Replica


class Policy(Protocol):
    def pick(self, candidates: Sequence[Replica]) -> Replica:
        """One of ``candidates`` (never empty)."""
        ...


def load(replica: Replica, tokens_per_request: int) -> float:
    """Requests this router has in flight there, plus the replica's reported queue, plus tokens
    still to generate in units of ``tokens_per_request``. The router's own counts are exact and
    current; the report adds other routers' work and lags by up to one report interval."""
    report = replica.report
    queued = report.queued if report is not None else 0
    tokens = max(replica.inflight_tokens, report.tokens_in_flight if report is not None else 0)
    return replica.inflight + queued + tokens / tokens_per_request


class LeastBusy:
    """The lowest :func:`load`; ties broken at random so equal replicas share work evenly."""

    def __init__(self, tokens_per_request: int, rng: random.Random | None = None) -> None:
        self.tokens_per_request = tokens_per_request
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Replica]) -> Replica:
        loads = [load(r, self.tokens_per_request) for r in candidates]
        lowest = min(loads)
        tied = [r for r, value in zip(candidates, loads, strict=True) if value - lowest < 1e-9]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class RoundRobin:
    """Each candidate in turn (by address), whatever its load."""

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Replica]) -> Replica:
        ordered = sorted(candidates, key=lambda r: r.address)
        self._turn += 1
        return ordered[(self._turn - 1) % len(ordered)]


POLICIES: dict[str, Callable[[int], Policy]] = {
    "least-busy": LeastBusy,
    "round-robin": lambda tokens_per_request: RoundRobin(),
}


def make_policy(name: str, tokens_per_request: int) -> Policy:
    try:
        return POLICIES[name](tokens_per_request)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; one of {', '.join(POLICIES)}") from None
