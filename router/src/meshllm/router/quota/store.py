"""Where quota state lives: a small protocol with two implementations, chosen by name."""

from __future__ import annotations

from typing import Protocol

from meshllm.api.types import QuotaUsage
from meshllm.router.quota.limits import Demand, Reservation, TenantLimits, Violation


class QuotaExceeded(Exception):
    """The request does not fit the tenant's limits now (or ever, where a violation has no
    retry time)."""

    def __init__(self, tenant: str, violations: list[Violation]) -> None:
        super().__init__(
            f"tenant {tenant!r} over quota: " + "; ".join(v.message for v in violations)
        )
        self.tenant, self.violations = tenant, violations


class QuotaStoreUnavailable(Exception):
    """The store could not be asked (Redis down or too slow): the router's setting decides
    whether the request is admitted unmetered or refused."""


class QuotaStore(Protocol):
    async def reserve(self, tenant: str, limits: TenantLimits, demand: Demand) -> Reservation:
        """Admit ``demand`` or raise QuotaExceeded; atomic across every router sharing the store."""
        ...

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """The request ended having used ``used_tokens``: free its slot, give back the rest."""
        ...

    async def usage(self, tenant: str, limits: TenantLimits) -> list[QuotaUsage]: ...

    async def close(self) -> None: ...


STORES = ("memory", "redis")


def make_store(
    kind: str, *, redis_url: str, concurrency_retry_s: float, lease_s: float, timeout_s: float
) -> QuotaStore:
    if kind == "redis":
        from meshllm.router.quota.redis_store import RedisQuotaStore

        return RedisQuotaStore(
            redis_url, concurrency_retry_s=concurrency_retry_s, lease_s=lease_s, timeout_s=timeout_s
        )
    from meshllm.router.quota.memory import MemoryQuotaStore

    return MemoryQuotaStore(concurrency_retry_s=concurrency_retry_s)
