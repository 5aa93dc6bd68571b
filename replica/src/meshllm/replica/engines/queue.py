"""The admission queue: priority first, then arrival order; batches group compatible requests."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class _Entry(Generic[T]):
    sort_key: tuple[int, int]
    item: T = field(compare=False)
    key: Hashable = field(compare=False)


class BatchQueue(Generic[T]):
    """Requests waiting for an engine worker, taken in compatible groups.

    ``take_batch`` starts from the most urgent request and adds the next most urgent ones
    that share its batch key (same sampling settings), up to ``max_size``.
    """

    def __init__(self) -> None:
        self._entries: list[_Entry[T]] = []  # arrival order; take_batch sorts by urgency
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[T]:
        return [e.item for e in self._entries]

    def put(self, item: T, key: Hashable, priority: int = 0) -> None:
        self._entries.append(_Entry((-priority, next(self._seq)), item, key))

    def take_batch(self, max_size: int) -> list[T]:
        if not self._entries:
            return []
        ordered = sorted(self._entries)
        key = ordered[0].key
        chosen = [e for e in ordered if e.key == key][:max_size]
        taken = {id(e) for e in chosen}
        self._entries = [e for e in self._entries if id(e) not in taken]
        return [e.item for e in chosen]

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Drop and return items for which ``predicate(item)`` is true (e.g. cancelled ones)."""
        gone = [e for e in self._entries if predicate(e.item)]
        if gone:
            self._entries = [e for e in self._entries if not predicate(e.item)]
        return [e.item for e in gone]
