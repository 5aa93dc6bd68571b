"""Admission: reserve a request's quota (a plain token count) before it is forwarded, settle it
with the tokens it really used when it ends (finished, failed or cancelled), report what is left."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter

from meshllm.api.errors import (
    FieldViolation,
    InvalidArgument,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from meshllm.api.tracing import child_of, ending, tracer
from meshllm.router.quota import (
    Demand,
    QuotaExceeded,
    QuotaStore,
    QuotaStoreUnavailable,
    Reservation,
)
from meshllm.router.tenants import Tenant

log = logging.getLogger(__name__)
Headers = tuple[tuple[str, str], ...]


class QuotaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejections = Counter(
            "meshllm_router_quota_rejections",
            "Requests refused by a tenant's quota, by tenant and limit.",
            ["tenant", "limit"],
            registry=registry,
        )
        self.store_failures = Counter(
            "meshllm_router_quota_store_failures",
            "Quota store calls that failed (Redis unreachable or slow), by operation and what the router did.",
            ["operation", "outcome"],
            registry=registry,
        )


class Admission:
    """``on_store_failure``: ``deny`` refuses requests while the store cannot be asked
    (UNAVAILABLE, reason QUOTA_STORE_UNAVAILABLE); ``allow`` admits them unmetered. Either way
    every failure is counted and logged at ERROR (at most one line per ``log_every_s``)."""

    def __init__(
        self,
        store: QuotaStore,
        on_store_failure: str,
        retry_after_s: float,
        metrics: QuotaMetrics,
        log_every_s: float = 5.0,
    ) -> None:
        self.store, self._policy, self._retry_s = store, on_store_failure, retry_after_s
        self._metrics, self._log_every_s = metrics, log_every_s
        self._last_log, self._unlogged = -math.inf, 0
        self._settling: set[asyncio.Task[None]] = set()

    async def reserve(self, tenant: Tenant, tokens: int, parent: trace.Span) -> Reservation | None:
        """Reserve ``tokens`` (prompt estimate plus what the request may generate) of the
        tenant's quota, or raise the refusal. None: nothing to settle (an unmetered tenant, or
        the store is down and the policy admits unmetered)."""
        if tenant.limits.unlimited:
            return None
        return await self._reserve(tenant, Demand(tokens), parent)

    async def _reserve(
        self, tenant: Tenant, demand: Demand, parent: trace.Span
    ) -> Reservation | None:
        span = tracer.start_span(
            "meshllm.router/quota",
            context=child_of(parent),
            attributes={"meshllm.tenant": tenant.name, "meshllm.reserved_tokens": demand.tokens},
        )
        with ending(span):
            try:
                reservation = await self.store.reserve(tenant.name, tenant.limits, demand)
            except QuotaExceeded as e:
                span.set_attribute("meshllm.quota.outcome", "exceeded")
                for v in e.violations:
                    self._metrics.rejections.labels(tenant.name, v.limit).inc()
                raise _refusal(e, demand) from None
            except QuotaStoreUnavailable as e:
                span.set_attribute("meshllm.quota.outcome", f"store unavailable: {self._policy}")
                self._store_down("reserve", e)
                return None
            span.set_attribute("meshllm.quota.outcome", "admitted")
            return reservation

    def _store_down(self, operation: str, error: QuotaStoreUnavailable) -> None:
        outcome = {"reserve": "denied" if self._policy == "deny" else "allowed"}.get(
            operation, "deferred"
        )
        self._metrics.store_failures.labels(operation, outcome).inc()
        now = time.monotonic()
        if now - self._last_log >= self._log_every_s:
            log.error(
                "quota store unreachable (%s): %s; %s (%d more failures since the last line)",
                error,
                operation,
                _CONSEQUENCE[outcome],
                self._unlogged,
            )
            self._last_log, self._unlogged = now, 0
        else:
            self._unlogged += 1
        if outcome == "denied":
            raise Unavailable(
                f"quota store unavailable: requests are refused until it is back ({error})",
                reason="QUOTA_STORE_UNAVAILABLE",
                retry_after=self._retry_s,
            )

    async def settle(self, reservation: Reservation, used: int) -> None:
        """Charge ``used`` tokens and free the request's slot; a cancelled caller still settles."""
        # A task of its own: a cancelled request still settles, and its caller need not wait
        # again if it is cancelled twice.
        task = asyncio.create_task(self._settle_now(reservation, used))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)

    async def _settle_now(self, reservation: Reservation, used: int) -> None:
        try:
            await self.store.settle(reservation, used)
        except QuotaStoreUnavailable as e:
            self._store_down("settle", e)

    async def close(self) -> None:
        """Wait for settles under way, then close the store."""
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self.store.close()


_CONSEQUENCE = {
    "denied": "refusing requests (redis_unavailable = deny)",
    "allowed": "ADMITTING REQUESTS UNMETERED (redis_unavailable = allow)",
    "deferred": "the request's settle is sent again until the store answers (its slot frees then)",
}


def _refusal(e: QuotaExceeded, demand: Demand) -> InvalidArgument | ResourceExhausted:
    quota = [QuotaViolation(f"tenant:{e.tenant}", f"{v.limit}: {v.message}") for v in e.violations]
    metadata = {"tenant": e.tenant, "limits": ",".join(v.limit for v in e.violations)}
    never = [v for v in e.violations if v.retry_after_s is None]
    if never:
        return InvalidArgument(
            f"the request can never fit tenant {e.tenant!r}'s quota: {never[0].message}; "
            f"lower max_tokens or the prompt",
            reason="REQUEST_EXCEEDS_QUOTA",
            metadata=metadata,
            field_violations=[FieldViolation("max_tokens", v.message) for v in never],
            quota_violations=quota,
        )
    retry = max(v.retry_after_s or 0.0 for v in e.violations)
    return ResourceExhausted(
        f"tenant {e.tenant!r} is over quota: {'; '.join(v.message for v in e.violations)}; "
        f"retry in {retry:.2f}s",
        reason="QUOTA_EXCEEDED",
        retry_after=retry,
        quota_violations=quota,
        metadata=metadata,
    )
