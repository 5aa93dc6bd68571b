"""Per-tenant quotas: limits, the pure ledger arithmetic and the stores that keep it."""

from meshllm.router.quota.limits import (
    LIMITS,
    Demand,
    Remaining,
    Reservation,
    TenantLimits,
    Violation,
)
from meshllm.router.quota.store import (
    STORES,
    QuotaExceeded,
    QuotaStore,
    QuotaStoreUnavailable,
    make_store,
)

__all__ = [
    "LIMITS",
    "STORES",
    "Demand",
    "QuotaExceeded",
    "QuotaStore",
    "QuotaStoreUnavailable",
    "Remaining",
    "Reservation",
    "TenantLimits",
    "Violation",
    "make_store",
]
