"""Choosing a replica: least-busy (the default), round-robin (for comparison), power-of-two
choices, and affinity (``affinity``). Pure logic: policies see ``RouteKey``, never protobuf."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshllm.router.affinity import Affinity, AffinitySettings, Outcome
from meshllm.router.registry import Replica
from meshllm.router.route_key import NO_KEY, RouteKey


class Policy(Protocol):
    def pick(self, candidates: Sequence[Replica], key: RouteKey = NO_KEY) -> Replica:
        """One of ``candidates`` (never empty) for the request ``key``."""
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

    def pick(self, candidates: Sequence[Replica], key: RouteKey = NO_KEY) -> Replica:
        loads = [load(r, self.tokens_per_request) for r in candidates]
        lowest = min(loads)
        tied = [r for r, value in zip(candidates, loads, strict=True) if value - lowest < 1e-9]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class RoundRobin:
    """Each candidate in turn (by address), whatever its load."""

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Replica], key: RouteKey = NO_KEY) -> Replica:
        ordered = sorted(candidates, key=lambda r: r.address)
        self._turn += 1
        return ordered[(self._turn - 1) % len(ordered)]


class PowerOfTwo:
    """Two distinct candidates at random, the lower :func:`load` of the two (ties at random):
    nearly least-busy's balance without every router sending the same burst to the same
    replica between two reports."""

    def __init__(self, tokens_per_request: int, rng: random.Random | None = None) -> None:
        self.tokens_per_request = tokens_per_request
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Replica], key: RouteKey = NO_KEY) -> Replica:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        la, lb = load(a, self.tokens_per_request), load(b, self.tokens_per_request)
        if abs(la - lb) < 1e-9:
            return self._rng.choice((a, b))
        return a if la < lb else b


@dataclass(frozen=True, kw_only=True)
class Routing:
    """What a policy is built from: the router's ``tokens_per_request``, a model's affinity
    knobs, and where affinity picks are counted."""

    tokens_per_request: int = 256
    affinity: AffinitySettings = field(default_factory=AffinitySettings)
    counted: Callable[[RouteKey, Outcome], None] = lambda key, outcome: None


def _affinity(r: Routing) -> Policy:
    return Affinity(
        r.affinity,
        load=functools.partial(load, tokens_per_request=r.tokens_per_request),
        fallback=LeastBusy(r.tokens_per_request),
        counted=r.counted,
    )


POLICIES: dict[str, Callable[[Routing], Policy]] = {
    "least-busy": lambda r: LeastBusy(r.tokens_per_request),
    "round-robin": lambda r: RoundRobin(),
    "power-of-two": lambda r: PowerOfTwo(r.tokens_per_request),
    "affinity": _affinity,
}


def make_policy(name: str, routing: Routing = Routing()) -> Policy:
    try:
        return POLICIES[name](routing)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; one of {', '.join(POLICIES)}") from None
