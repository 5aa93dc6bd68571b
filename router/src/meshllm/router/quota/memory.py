"""Quota state in this router's memory: the default for one router."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable

from meshllm.api.types import QuotaUsage
from meshllm.router.quota import ledger
from meshllm.router.quota.limits import Demand, Reservation, TenantLimits
from meshllm.router.quota.store import QuotaExceeded


class MemoryQuotaStore:
    """Every tenant's ledger in a dict; ``clock`` is wall-clock seconds (days are UTC days)."""

    def __init__(
        self, *, concurrency_retry_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._ledgers: defaultdict[str, ledger.TenantLedger] = defaultdict(ledger.TenantLedger)
        self._retry_s, self._clock = concurrency_retry_s, clock

    async def reserve(self, tenant: str, limits: TenantLimits, demand: Demand) -> Reservation:
        book = self._ledgers[tenant]
        violations = ledger.check(book, limits, demand, self._clock(), self._retry_s)
        if violations:
            raise QuotaExceeded(tenant, violations)
        lease = uuid.uuid4().hex
        remaining = ledger.reserve(book, limits, demand, lease)
        return Reservation(
            tenant=tenant,
            tokens=demand.tokens,
            day=book.day,
            lease=lease,
            limits=limits,
            remaining=remaining,
        )

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        ledger.settle(self._ledgers[reservation.tenant], reservation, used_tokens, self._clock())

    async def usage(self, tenant: str, limits: TenantLimits) -> list[QuotaUsage]:
        return ledger.usage(self._ledgers[tenant], tenant, limits, self._clock())

    async def close(self) -> None:
        pass
