"""Who is calling: the API key in ``authorization: Bearer <key>`` metadata, matched against
the tenants' stored hashes in constant time, and the admin role for the Admin service."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from meshllm.api.errors import MeshError, PermissionDenied, Unauthenticated
from meshllm.router.tenants import ANONYMOUS, Role, Tenant, load_tenants

log = logging.getLogger(__name__)
Metadata = Iterable[tuple[str, str | bytes]]


class Authenticator:
    """Maps a call's metadata to its tenant. ``tenants=None`` disables authentication: every
    caller is the admin tenant ``anonymous`` (local development only; logged at start)."""

    def __init__(self, tenants: Sequence[Tenant] | None, registry: CollectorRegistry) -> None:
        self.enabled = tenants is not None
        self._entries: tuple[tuple[bytes, Tenant], ...] = ()
        self.tenants: dict[str, Tenant] = {}
        self.use(tenants or ())
        self._failures = Counter(
            "meshllm_router_auth_failures",
            "Calls refused by authentication or authorization, by reason.",
            ["reason"],
            registry=registry,
        )

    def use(self, tenants: Sequence[Tenant]) -> None:
        """Replace the tenants (a reloaded file); calls already admitted keep theirs."""
        self._entries = tuple((d, t) for t in tenants for d in t.key_digests)
        self.tenants = {t.name: t for t in tenants}

    def authenticate(self, metadata: Metadata | None) -> Tenant:
        if not self.enabled:
            return ANONYMOUS
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            raise self._refuse(
                "missing",
                Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'"),
            )
        scheme, _, key = (
            values[0] if isinstance(values[0], str) else values[0].decode()
        ).partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise self._refuse(
                "malformed",
                Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'"),
            )
        tenant = self._match(hashlib.sha256(key.strip().encode()).digest())
        if tenant is None:
            raise self._refuse("invalid", Unauthenticated("invalid API key"))
        return tenant

    def _match(self, digest: bytes) -> Tenant | None:
        # Compare with every stored digest, without stopping at a match: the time taken says
        # nothing about which key (or how much of one) matched.
        found = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found

    def require_admin(self, tenant: Tenant) -> None:
        if tenant.role is not Role.ADMIN:
            raise self._refuse(
                "forbidden",
                PermissionDenied(
                    f"tenant {tenant.name!r} has role {tenant.role.value!r}; the Admin service needs role 'admin'"
                ),
            )

    def _refuse(self, reason: str, error: MeshError) -> MeshError:
        self._failures.labels(reason).inc()
        return error


class TenantsFile:
    """The tenants file, re-read when it changes (a rotated Kubernetes Secret); a file that
    stops parsing keeps the last good tenants and logs why."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._mtime()
        self.tenants = load_tenants(path)

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return -1.0

    def reload(self) -> tuple[Tenant, ...] | None:
        """The new tenants if the file changed and parses; otherwise None."""
        stamp = self._mtime()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            self.tenants = load_tenants(self.path)
        except MeshError as e:
            log.error(
                "tenants file changed but cannot be used; keeping the previous tenants: %s",
                e.message,
            )
            return None
        log.info("tenants file %s reloaded: %d tenants", self.path, len(self.tenants))
        return self.tenants
