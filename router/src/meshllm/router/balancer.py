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
    """Requests in flight on the replica plus tokens still to generate there, in units of
    ``tokens_per_request``.

    This router's own counts are exact and current (they change the moment it sends a request
    or receives a chunk); the replica's report adds only what other routers sent — the part of
    it above this router's counts when the report arrived — so a report that lags by up to an
    interval neither hides this router's new requests nor keeps finished ones alive.
    """
    return (
        replica.inflight
        + replica.others_requests
        + (replica.inflight_tokens + replica.others_tokens) / tokens_per_request
    )


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
