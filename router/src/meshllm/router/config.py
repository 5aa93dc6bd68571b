"""Router configuration: a frozen dataclass, loadable from a TOML file, validated once."""

from __future__ import annotations

import functools
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from meshllm.api.errors import FieldViolation, InvalidArgument, invalid_argument, invalid_fields
from meshllm.api.tls import ChannelTLS, ServerTLS
from meshllm.router.placement.catalog import CatalogModel, catalog_violations, parse_catalog
from meshllm.router.quota.store import STORES

POLICIES = ("least-busy", "round-robin")
AUTH_MODES = ("api-key", "none")
STORE_FAILURE_POLICIES = ("deny", "allow")
REDIS_URL_ENV = "MESHLLM_REDIS_URL"
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", tuple: "a list of strings"}


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Settings of one router process. A TOML file's ``[router]`` table uses the same names."""

    host: str = "0.0.0.0"
    port: int = 50051
    replicas: tuple[str, ...] = ()
    """Static replica addresses, ``host:port``."""
    replicas_file: str = ""
    """A text file with one ``host:port`` per line (``#`` comments), re-read every ``refresh_s``."""
    dns: str = ""
    """``name:port`` re-resolved every ``refresh_s``; every address it returns is a replica (a
    Kubernetes headless Service)."""
    refresh_s: float = 5.0
    policy: str = "least-busy"
    """``least-busy`` or ``round-robin`` (kept for comparison)."""
    tokens_per_request: int = 256
    """Least-busy load = requests in flight + queued + tokens in flight / this: how many tokens
    still to generate weigh as much as one more request."""
    max_attempts: int = 3
    """Replicas tried for one request when a failure happens before its first token."""
    report_interval_ms: int = 250
    """Load-report period asked of each replica."""
    stale_after_s: float = 2.0
    """A replica whose last report is older than this gets no new work until it reports again."""
    reconnect_max_s: float = 5.0
    """Longest wait between attempts to reach a replica that stopped answering."""
    retry_after_s: float = 1.0
    """RetryInfo sent with UNAVAILABLE when no healthy replica serves the model."""
    drain_grace_s: float = 30.0
    """On SIGTERM, how long in-flight streams may run before the router exits."""
    max_message_bytes: int = 4 * 1024 * 1024
    metrics_port: int | None = None
    """HTTP port of the Prometheus ``/metrics`` endpoint (0: a free port; None: off)."""
    health_port: int | None = None
    """A plaintext port answering only ``grpc.health.v1`` (0: a free port; None: off), for
    probes that cannot speak TLS when the main port does (kubelet gRPC probes)."""
    auth: str = "api-key"
    """``api-key``: every call needs a key listed in ``tenants_file``. ``none``: no
    authentication, every caller is the admin tenant ``anonymous`` (local development only)."""
    tenants_file: str = ""
    """TOML file of tenants, their key hashes, roles and quotas (see meshllm.router.tenants);
    re-read when it changes."""
    quota_store: str = "memory"
    """``memory`` (one router) or ``redis`` (several routers enforce one global limit)."""
    redis_url: str = ""
    """``redis://[:password@]host:port/db`` for the redis store; MESHLLM_REDIS_URL overrides it,
    which keeps a password out of the config file."""
    redis_url_file: str = ""
    """A file holding the Redis URL instead (e.g. a mounted Kubernetes Secret), read once at
    start, surrounding whitespace stripped. Set this or ``redis_url`` (MESHLLM_REDIS_URL sets
    ``redis_url``, so it cannot go with this either)."""
    redis_unavailable: str = "deny"
    """When Redis cannot be reached: ``deny`` refuses requests (UNAVAILABLE,
    QUOTA_STORE_UNAVAILABLE), ``allow`` admits them unmetered. Both log at ERROR and count
    ``meshllm_router_quota_store_failures_total``."""
    redis_timeout_s: float = 0.25
    """Longest wait for one Redis call before it counts as unreachable."""
    quota_lease_s: float = 900.0
    """Redis store: a concurrent-request slot is freed after this even if its router died
    without settling (a request running longer stops counting against the limit)."""

    # Model placement (docs/admin.md). The catalog comes from the file's [models.<id>] tables.
    models: tuple[CatalogModel, ...] = ()
    """The model catalog: what the router may place on replicas, and on how many."""
    load_timeout_s: float = 600.0
    """Longest a replica may take to load a model before the router stops waiting for it
    (the replica goes on; a later report shows READY or FAILED)."""
    load_retry_s: float = 60.0
    """After a model failed to load, how long automatic placement leaves it alone (an admin
    ``load`` tries again at once)."""
    unload_drain_s: float = 30.0
    """Default time in-flight requests may finish on a replica being unloaded or scaled down."""

    # TLS (docs/tls.md). All "" (the default): plaintext, for local development only.
    tls_cert: str = ""
    """PEM certificate (chain) the router presents to clients; with ``tls_key`` it speaks TLS only."""
    tls_key: str = ""
    """PEM private key of ``tls_cert`` (unencrypted)."""
    tls_client_ca: str = ""
    """PEM CA file; set, mutual TLS: only clients presenting a certificate signed by this CA get
    through the handshake."""
    replica_tls_ca: str = ""
    """PEM CA file that signed the replicas' certificates; set, the router reaches replicas over
    TLS. (Any ``replica_tls_*`` setting turns TLS to replicas on; without this one the system's
    root certificates are trusted.)"""
    replica_tls_cert: str = ""
    """PEM client certificate the router presents to replicas that run mutual TLS (with
    ``replica_tls_key``)."""
    replica_tls_key: str = ""
    """PEM private key of ``replica_tls_cert`` (unencrypted)."""
    replica_tls_server_name: str = ""
    """Name to check every replica's certificate against, when replica addresses do not carry
    it (IP addresses, pod names); "" checks each address's host."""

    @functools.cached_property
    def server_tls(self) -> ServerTLS | None:
        """TLS for clients → router, with its files read (once per config); None: plaintext."""
        if not (self.tls_cert or self.tls_key or self.tls_client_ca):
            return None
        return ServerTLS(cert=self.tls_cert, key=self.tls_key, client_ca=self.tls_client_ca)

    @functools.cached_property
    def replica_tls(self) -> ChannelTLS | None:
        """TLS for router → replicas, with its files read (once per config); None: plaintext."""
        if not (self.replica_tls_ca or self.replica_tls_cert or self.replica_tls_key
                or self.replica_tls_server_name):  # fmt: skip
            return None
        return ChannelTLS(ca=self.replica_tls_ca, cert=self.replica_tls_cert,
                          key=self.replica_tls_key, server_name=self.replica_tls_server_name,
                          prefix="replica_tls_")  # fmt: skip

    @functools.cached_property
    def _redis_url_from_file(self) -> str:
        """``redis_url_file``'s content, stripped (read once per config). Errors name the file,
        never what it holds: a password."""
        path = self.redis_url_file
        try:
            url = Path(path).read_bytes().decode().strip()
        except OSError as e:
            raise invalid_argument(
                "redis_url_file", f"cannot read {path}: {e.strerror or e}"
            ) from e
        except UnicodeDecodeError:
            raise invalid_argument("redis_url_file", f"{path} is not UTF-8 text") from None
        if not url:
            raise invalid_argument("redis_url_file", f"{path} is empty")
        return url

    def redis_address(self) -> str:
        """The Redis URL of the redis store: ``redis_url_file``'s content when that is set, else
        ``redis_url`` (validate() refuses both)."""
        return self._redis_url_from_file if self.redis_url_file else self.redis_url

    def _tls_violations(self) -> list[FieldViolation]:
        bad: list[FieldViolation] = []
        for settings in ("server_tls", "replica_tls"):
            try:
                getattr(self, settings)  # reads and checks the PEM files
            except InvalidArgument as e:
                bad.extend(e.field_violations)
        return bad

    def validate(self) -> RouterConfig:
        bad: list[FieldViolation] = []
        if not 0 <= self.port <= 65535:
            bad.append(FieldViolation("port", f"{self.port} is out of range"))
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            bad.append(FieldViolation("health_port", f"{self.health_port} is out of range"))
        if self.policy not in POLICIES:
            bad.append(
                FieldViolation("policy", f"{self.policy!r} is not one of {', '.join(POLICIES)}")
            )
        for address in self.replicas:
            if not valid_address(address):
                bad.append(FieldViolation("replicas", f"{address!r} is not host:port"))
        if self.dns and not valid_address(self.dns):
            bad.append(FieldViolation("dns", f"{self.dns!r} is not name:port"))
        for name in ("refresh_s", "stale_after_s", "reconnect_max_s", "retry_after_s",
                     "load_timeout_s", "load_retry_s", "unload_drain_s"):  # fmt: skip
            if getattr(self, name) <= 0:
                bad.append(FieldViolation(name, "must be positive"))
        for name in ("tokens_per_request", "max_attempts", "report_interval_ms"):
            if getattr(self, name) < 1:
                bad.append(FieldViolation(name, "must be at least 1"))
        bad += self._auth_problems()
        if self.drain_grace_s < 0:
            bad.append(FieldViolation("drain_grace_s", "must not be negative"))
        bad.extend(self._tls_violations())
        bad.extend(catalog_violations(self.models))
        if bad:
            raise invalid_fields("invalid router config", bad)
        return self

    def _auth_problems(self) -> list[FieldViolation]:
        bad: list[FieldViolation] = []
        if self.auth not in AUTH_MODES:
            bad.append(
                FieldViolation("auth", f"{self.auth!r} is not one of {', '.join(AUTH_MODES)}")
            )
        elif self.auth == "api-key" and not self.tenants_file:
            bad.append(FieldViolation("tenants_file", "is required with auth = 'api-key' "
                                      "(or set auth = 'none' for local development)"))  # fmt: skip
        elif self.auth == "none" and self.tenants_file:
            bad.append(FieldViolation("tenants_file", "is ignored with auth = 'none': remove one"))
        if self.quota_store not in STORES:
            bad.append(
                FieldViolation(
                    "quota_store", f"{self.quota_store!r} is not one of {', '.join(STORES)}"
                )
            )
        elif self.quota_store == "redis" and not (self.redis_url or self.redis_url_file):
            bad.append(FieldViolation("redis_url", "or redis_url_file is required with "
                                      "quota_store = 'redis'"))  # fmt: skip
        bad += self._redis_url_file_problems()
        if self.redis_unavailable not in STORE_FAILURE_POLICIES:
            bad.append(
                FieldViolation(
                    "redis_unavailable", f"{self.redis_unavailable!r} is not 'deny' or 'allow'"
                )
            )
        for name in ("redis_timeout_s", "quota_lease_s"):
            if getattr(self, name) <= 0:
                bad.append(FieldViolation(name, "must be positive"))
        return bad

    def _redis_url_file_problems(self) -> list[FieldViolation]:
        if self.redis_url_file and self.redis_url:
            return [FieldViolation("redis_url_file", "is set together with redis_url (or "
                                   "MESHLLM_REDIS_URL): set one")]  # fmt: skip
        try:
            self.redis_address()  # reads redis_url_file when it is set
        except InvalidArgument as e:
            return list(e.field_violations)
        return []

    @property
    def has_replica_source(self) -> bool:
        return bool(self.replicas or self.replicas_file or self.dns)


def valid_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def read_config_file(path: Path) -> dict[str, Any]:
    """RouterConfig settings from a TOML file: its ``[router]`` table, with names and types
    checked, and its ``[models.<id>]`` tables as the catalog (``models``)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"cannot read router config {path}: {e}") from e
    if unknown_tables := sorted(set(data) - {"router", "models"}):
        raise InvalidArgument(f"{path}: unknown tables {', '.join(unknown_tables)}; a router config "
                              "has [router] and [models.<id>] tables",
                              field_violations=[FieldViolation(k, "unknown table") for k in unknown_tables])  # fmt: skip
    table = data.get("router", {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"{path}: [router] must be a table")
    known = {f.name for f in fields(RouterConfig)} - {"models"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise InvalidArgument(f"{path}: unknown [router] settings: {', '.join(unknown)}",
                              field_violations=[FieldViolation(k, "unknown setting") for k in unknown])  # fmt: skip
    defaults = RouterConfig()
    for key, value in table.items():
        default = getattr(defaults, key)
        expected = int if default is None else type(default)  # None: an optional port
        if expected is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
            table[key] = tuple(value)
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            table[key] = float(value)
        elif type(value) is not expected:
            what = _TYPE_NAMES[expected]
            raise InvalidArgument(f"{path}: [router] {key} must be {what}, not {value!r}",
                                  field_violations=[FieldViolation(key, f"must be {what}")])  # fmt: skip
    if "models" in data:
        table["models"] = parse_catalog(data["models"], str(path))
    return table


def from_environment(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings the environment overrides (the one place the router reads MESHLLM_ variables):
    MESHLLM_REDIS_URL sets ``redis_url`` (with ``redis_url_file`` also set, validate() asks to
    set one)."""
    if url := os.environ.get(REDIS_URL_ENV):
        settings = {**settings, "redis_url": url}
    return settings
