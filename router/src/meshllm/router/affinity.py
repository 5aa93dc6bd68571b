"""Affinity: bounded-load consistent hashing on a session key or a prompt-prefix hash. Pure logic.

Requests with the same key go to the same replica, so an engine with a prefix cache
(ExLlamaV3) finds the session's or the shared prompt's pages already there. A replica is
eligible only while its load is within the bound (Mirrokni, Thorup, Zadimoghaddam, "Consistent
Hashing with Bounded Loads")::

    load <= load_factor x mean load over the candidates + 1

(the +1: one request's worth, so a nearly idle mesh keeps each key at home). A key whose
replica is beyond the bound goes on clockwise round the ring to the first one within it, the
same one for every request of that key, so its prefix is cached on few replicas. The least
loaded replica is always within the bound (its load is at most the mean, load_factor >= 1), so
the walk ends at or before it; least-busy takes requests that have no key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from meshllm.api.errors import FieldViolation
from meshllm.router.registry import Replica
from meshllm.router.ring import HashRing, key_hash
from meshllm.router.route_key import MAX_PREFIX_CHARS, MAX_PREFIX_TOKENS, NO_KEY, RouteKey

if TYPE_CHECKING:  # balancer builds this policy by name
    from meshllm.router.balancer import Policy

_RINGS_KEPT = 16  # candidate sets of recent picks (one per model, and retries without a replica)


class Outcome(StrEnum):
    """How a pick went: the label of ``meshllm_router_affinity_picks_total``."""

    HIT = "hit"
    """The key's own replica took it."""
    FALLBACK = "fallback"
    """Its replica was beyond the bound: the next one round the ring within it did."""
    NO_KEY = "no_key"
    """No session and nothing to hash (prefix hashing off): least-busy."""


@dataclass(frozen=True, kw_only=True)
class AffinitySettings:
    """A model's affinity knobs (catalog ``affinity_*``)."""

    load_factor: float = 1.25
    """c: a replica takes a key's requests while its load <= c x mean load + 1."""
    prefix_chars: int = 256
    """Characters of a text prompt (instructions, messages, prompt) hashed when no session key
    comes; 0: sessions only."""
    prefix_tokens: int = 64
    """Token ids of a ``token_ids`` prompt hashed likewise; 0: sessions only."""

    def violations(self, where: str) -> list[FieldViolation]:
        bad = []
        c = self.load_factor
        if not (isinstance(c, (int, float)) and 1.0 <= c < float("inf")):
            bad.append(
                FieldViolation(
                    f"{where}affinity_load_factor",
                    f"{c} is not a number of at least 1.0 (1.0: at most one request above "
                    "the mean load)",
                )
            )
        for name, most in (
            ("prefix_chars", MAX_PREFIX_CHARS),
            ("prefix_tokens", MAX_PREFIX_TOKENS),
        ):
            value = getattr(self, name)
            if not 0 <= value <= most:
                bad.append(FieldViolation(f"{where}affinity_{name}", f"must be 0 to {most}"))
        return bad


class Affinity:
    """Same key, same replica, within a load bound; ``counted`` hears each pick's outcome."""

    def __init__(
        self,
        settings: AffinitySettings,
        *,
        load: Callable[[Replica], float],
        fallback: Policy,
        counted: Callable[[RouteKey, Outcome], None] = lambda key, outcome: None,
    ) -> None:
        self.settings, self._load, self._fallback, self._counted = settings, load, fallback, counted
        self._rings: dict[tuple[str, ...], HashRing] = {}

    def pick(self, candidates: Sequence[Replica], key: RouteKey = NO_KEY) -> Replica:
        replica, outcome = self.choose(candidates, key)
        self._counted(key, outcome)
        return replica

    def choose(self, candidates: Sequence[Replica], key: RouteKey) -> tuple[Replica, Outcome]:
        hashed = self.hashed(key)
        if hashed is None:
            return self._fallback.pick(candidates, key), Outcome.NO_KEY
        by_address = {r.address: r for r in candidates}
        loads = {r.address: self._load(r) for r in candidates}
        bound = self.settings.load_factor * sum(loads.values()) / len(loads) + 1.0
        for i, address in enumerate(self._ring(by_address).walk(hashed)):
            if loads[address] <= bound + 1e-9:
                return by_address[address], Outcome.HIT if i == 0 else Outcome.FALLBACK
        # unreachable with load_factor >= 1 (the least loaded is within the bound); a NaN load
        # would get here
        return self._fallback.pick(candidates, key), Outcome.FALLBACK

    def hashed(self, key: RouteKey) -> int | None:
        """The ring position of ``key``: its session (per tenant) first, else its prompt's
        start; None when neither applies."""
        s = self.settings
        if key.session:
            return key_hash(f"s\0{key.tenant}\0{key.session}".encode(errors="surrogatepass"))
        if key.prefix and s.prefix_chars:
            return key_hash(f"p\0{key.prefix[: s.prefix_chars]}".encode(errors="surrogatepass"))
        if key.token_ids and s.prefix_tokens:
            ids = key.token_ids[: s.prefix_tokens]
            return key_hash(b"t\0" + b"".join(t.to_bytes(4, "little") for t in ids))
        return None

    def _ring(self, by_address: dict[str, Replica]) -> HashRing:
        addresses = tuple(sorted(by_address))
        ring = self._rings.get(addresses)
        if ring is None:
            if len(self._rings) >= _RINGS_KEPT:
                del self._rings[next(iter(self._rings))]
            ring = self._rings[addresses] = HashRing(addresses)
        return ring
