"""A consistent-hash ring of replica addresses with virtual nodes. Pure logic.

Each address stands at ``VNODES`` points of a 64-bit circle; a key belongs to the first point
clockwise from its hash. Adding or removing one of N addresses moves only the keys of the
points it gains or loses, about 1/N of them, and the points make each address's share close
to 1/N (with 160 points the spread of shares is a few per cent).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator

VNODES = 160


def key_hash(data: bytes) -> int:
    """A stable 64-bit hash (the same in every router process, unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, addresses: Iterable[str], vnodes: int = VNODES) -> None:
        points = sorted(
            (key_hash(f"{address}#{i}".encode()), address)
            for address in set(addresses)
            for i in range(vnodes)
        )
        self._hashes = [h for h, _ in points]
        self._owners = [a for _, a in points]
        self.size = len(set(self._owners))

    def walk(self, key: int) -> Iterator[str]:
        """Every address once, clockwise from ``key``: its owner first, then where the key
        goes if that one cannot take it."""
        if not self._hashes:
            return
        start, seen = bisect.bisect_left(self._hashes, key), set[str]()
        for i in range(len(self._owners)):
            owner = self._owners[(start + i) % len(self._owners)]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == self.size:
                    return

    def owner(self, key: int) -> str:
        return next(self.walk(key))
