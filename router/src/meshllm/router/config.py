"""Router configuration: frozen sub-configs, one per component, loadable from TOML, validated once.

A config file has a ``[router]`` table for the router's own settings, one sub-table per part
(``[router.discovery]``, ``[router.quota]``, ``[router.redis]``, ``[router.placement]``,
``[router.http]``, ``[router.queue]``, ``[router.outliers]``, ``[router.tls]``,
``[router.replica_tls]``) and the model catalog as ``[models.<id>]`` tables.
Each component receives only its sub-config. Command-line flags use flat names
(``--stale-after``, ``--redis-url``); ``FLAT_NAMES`` maps each to its place.
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

from meshllm.api.errors import FieldViolation, InvalidArgument, invalid_argument, invalid_fields
from meshllm.api.tls import ChannelTLS, ServerTLS
from meshllm.router.placement.catalog import CatalogModel, catalog_violations, parse_catalog
from meshllm.router.quota.store import STORES

POLICIES = ("least-busy", "round-robin", "power-of-two", "affinity")
AUTH_MODES = ("api-key", "none")
STORE_FAILURE_POLICIES = ("deny", "allow")
REDIS_URL_ENV = "MESHLLM_REDIS_URL"


def flat(section: str, key: str) -> str:
    """The flat (command-line) name of ``[router.<section>] key``, as errors name settings."""
    return _FLAT.get((section, key), key)


def _positive(config: object, where: str, *names: str) -> list[FieldViolation]:
    return [
        FieldViolation(flat(where, n), "must be positive") for n in names if getattr(config, n) <= 0
    ]


@dataclass(frozen=True, kw_only=True)
class DiscoveryConfig:
    """Where the replicas are and how the router follows them (``[router.discovery]``)."""

    replicas: tuple[str, ...] = ()
    """Static replica addresses, ``host:port``."""
    replicas_file: str = ""
    """A text file with one ``host:port`` per line (``#`` comments), re-read every ``refresh_s``."""
    dns: str = ""
    """``name:port`` re-resolved every ``refresh_s``; every address it returns is a replica (a
    Kubernetes headless Service)."""
    refresh_s: float = 5.0
    """How often the replicas file and DNS name (and the tenants file) are read again."""
    report_interval_ms: int = 250
    """Load-report period asked of each replica."""
    stale_after_s: float = 2.0
    """A replica whose last report is older than this gets no new work until it reports again."""
    reconnect_max_s: float = 5.0
    """Longest wait between attempts to reach a replica that stopped answering."""

    @property
    def has_source(self) -> bool:
        return bool(self.replicas or self.replicas_file or self.dns)

    @property
    def dynamic(self) -> bool:
        return bool(self.replicas_file or self.dns)

    def violations(self) -> list[FieldViolation]:
        bad = [
            FieldViolation(flat("discovery", "replicas"), f"{a!r} is not host:port")
            for a in self.replicas
            if not valid_address(a)
        ]
        if self.dns and not valid_address(self.dns):
            bad.append(FieldViolation(flat("discovery", "dns"), f"{self.dns!r} is not name:port"))
        bad += _positive(self, "discovery", "refresh_s", "stale_after_s", "reconnect_max_s")
        if self.report_interval_ms < 1:
            bad.append(
                FieldViolation(flat("discovery", "report_interval_ms"), "must be at least 1")
            )
        return bad


@dataclass(frozen=True, kw_only=True)
class QuotaConfig:
    """Where quota counters live (``[router.quota]``)."""

    store: str = "memory"
    """``memory`` (one router) or ``redis`` (several routers enforce one global limit; needs
    ``[router.redis]``)."""
    unavailable: str = "deny"
    """When the store cannot be reached: ``deny`` refuses requests (UNAVAILABLE,
    QUOTA_STORE_UNAVAILABLE), ``allow`` admits them unmetered. Both log at ERROR and count
    ``meshllm_router_quota_store_failures_total``."""
    lease_s: float = 30.0
    """Redis store: how long a concurrent-request slot outlives its router. The router renews
    the leases of its running requests every third of this, so a slot is held as long as its
    request runs, and one whose router died without settling frees within ``lease_s``."""

    def violations(self) -> list[FieldViolation]:
        bad = []
        if self.store not in STORES:
            bad.append(
                FieldViolation(
                    flat("quota", "store"), f"{self.store!r} is not one of {', '.join(STORES)}"
                )
            )
        if self.unavailable not in STORE_FAILURE_POLICIES:
            bad.append(
                FieldViolation(
                    flat("quota", "unavailable"), f"{self.unavailable!r} is not 'deny' or 'allow'"
                )
            )
        return bad + _positive(self, "quota", "lease_s")


@dataclass(frozen=True, kw_only=True)
class RedisConfig:
    """The Redis server routers share (``[router.redis]``): quota counters (``quota.store =
    "redis"``) and, when ``placement.share_counts`` is on, desired replica counts."""

    url: str = ""
    """``redis://[:password@]host:port/db``; MESHLLM_REDIS_URL overrides it, which keeps a
    password out of the config file."""
    url_file: str = ""
    """A file holding the URL instead (e.g. a mounted Kubernetes Secret), read once at start,
    surrounding whitespace stripped. Set this or ``url`` (MESHLLM_REDIS_URL sets ``url``)."""
    timeout_s: float = 0.25
    """Longest wait for one Redis call before it counts as unreachable."""

    @property
    def configured(self) -> bool:
        return bool(self.url or self.url_file)

    @functools.cached_property
    def _url_from_file(self) -> str:
        """``url_file``'s content, stripped (read once). Errors name the file, never what it
        holds: a password."""
        path = self.url_file
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

    def address(self) -> str:
        """The URL: ``url_file``'s content when that is set, else ``url``."""
        return self._url_from_file if self.url_file else self.url

    def violations(self) -> list[FieldViolation]:
        if self.url_file and self.url:
            return [
                FieldViolation(
                    flat("redis", "url_file"),
                    "is set together with redis_url (or MESHLLM_REDIS_URL): set one",
                )
            ]
        try:
            self.address()
        except InvalidArgument as e:
            return list(e.field_violations)
        return _positive(self, "redis", "timeout_s")


@dataclass(frozen=True, kw_only=True)
class PlacementConfig:
    """How the router keeps catalog models on replicas (``[router.placement]``, docs/admin.md)."""

    load_timeout_s: float = 600.0
    """Longest a replica may take to load a model before the router stops waiting for it
    (the replica goes on; a later report shows READY or FAILED)."""
    load_retry_s: float = 60.0
    """After a model failed to load, how long automatic placement leaves it alone (an admin
    ``load`` tries again at once)."""
    unload_drain_s: float = 30.0
    """Default time in-flight requests may finish on a replica being unloaded or scaled down."""
    refresh_s: float = 5.0
    """Placement looks again at least this often (it also wakes at once on every replica change):
    what matters here is another router's change to a shared count."""
    share_counts: bool = False
    """Keep desired replica counts in ``[router.redis]`` too, so that a scale-down through one
    router holds for every router sharing it and outlives restarts."""

    def violations(self) -> list[FieldViolation]:
        names = ("load_timeout_s", "load_retry_s", "unload_drain_s", "refresh_s")
        return _positive(self, "placement", *names)


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    """The OpenAI-compatible HTTP front (``[router.http]``, docs/http.md)."""

    port: int | None = None
    """Port of ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/health``
    (0: a free port; None: off). It speaks the gRPC port's TLS (``[router.tls]``), mutual TLS
    included; plaintext when that is off."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body accepted (a larger one is answered 413)."""
    timeout_s: float = 600.0
    """Deadline of one HTTP request (HTTP carries none of its own): the same deadline a gRPC
    client sets, passed to the replica; past it the reply is 504 or the stream ends with an error."""

    def violations(self) -> list[FieldViolation]:
        bad = _positive(self, "http", "max_body_bytes", "timeout_s")
        if self.port is not None and not 0 <= self.port <= 65535:
            bad.append(FieldViolation(flat("http", "port"), f"{self.port} is out of range"))
        return bad


@dataclass(frozen=True, kw_only=True)
class QueueConfig:
    """The router's fair queue for saturated models (``[router.queue]``, docs/router.md)."""

    enabled: bool = True
    """Hold requests in the router while every replica of their model is saturated, and give
    freed slots by priority lane, then to the tenant served least (by weight). Off: requests
    go at once and wait, first come first served, in the replicas' own queues."""
    replica_queue: int = 0
    """Requests a replica may hold waiting beyond its capacity (the requests its engine runs at
    once, from its load report) before the router holds them. 0: replicas queue nothing, so
    every wait is fair; a few hide the round trip between a slot freeing and the next request."""
    reserve: float = 0.25
    """Share of each replica's capacity that only tenants running fewer requests than their fair
    share (capacity x weight / the weights of tenants active in the last 2 s) may take:
    a flood fills the rest, so a light tenant's request starts at once instead of waiting for
    a slot. A tenant alone is under its share, so it may use every slot."""
    max_queued: int = 256
    """Requests of one tenant that may wait at once (a tenant's ``max_queued`` overrides it);
    one more is RESOURCE_EXHAUSTED, reason QUEUE_FULL."""
    max_wait_s: float = 30.0
    """Longest a request may wait (a tenant's ``max_queue_wait_s`` overrides it); then
    RESOURCE_EXHAUSTED, reason QUEUE_WAIT_EXCEEDED."""
    max_total: int = 10_000
    """Requests that may wait in this router at once, all tenants and models together."""
    share_interval_s: float = 0.5
    """With ``quota.store = "redis"``: how often this router adds the tokens it served each
    tenant to the counters all routers share, and reads theirs."""

    def violations(self) -> list[FieldViolation]:
        bad = _positive(self, "queue", "max_queued", "max_wait_s", "max_total", "share_interval_s")
        if self.replica_queue < 0:
            bad.append(FieldViolation(flat("queue", "replica_queue"), "must not be negative"))
        if not 0.0 <= self.reserve < 1.0:
            bad.append(FieldViolation(flat("queue", "reserve"), "must be from 0 to below 1"))
        return bad


@dataclass(frozen=True, kw_only=True)
class OutlierConfig:
    """Outlier ejection (``[router.outliers]``, docs/router.md): a replica that fails requests
    fast gets none for a while, however idle its load reports make it look."""

    enabled: bool = True
    """Off: only a broken connection or a stale load report ejects a replica."""
    window_s: float = 10.0
    """How far back the failure rate looks."""
    min_requests: int = 5
    """Attempts that must have ended within ``window_s`` before the rate can eject."""
    failure_rate: float = 0.5
    """Eject when at least this share of those attempts failed (INTERNAL, UNKNOWN,
    UNAVAILABLE, ABORTED, DATA_LOSS, a transport failure, a reply cut short)."""
    consecutive_failures: int = 5
    """Eject after this many failures in a row, whatever the rate (0: this rule is off)."""
    base_ejection_s: float = 5.0
    """The first ejection lasts this long; each one in a row adds as much again."""
    max_ejection_s: float = 60.0
    """The longest an ejection lasts."""
    max_ejected_percent: int = 50
    """At most this share of a model's replicas is ejected at once (at least one of two or
    more; never the last one)."""
    ramp_s: float = 10.0
    """After an ejection the replica's chance of being a candidate rises from 10 % to 100 %
    over this time; a failure meanwhile ejects it again, a clean ramp resets the count of
    ejections in a row (0: no ramp)."""

    def violations(self) -> list[FieldViolation]:
        bad = _positive(self, "outliers", "window_s", "base_ejection_s")
        if self.max_ejection_s < self.base_ejection_s:
            why = f"must be at least {flat('outliers', 'base_ejection_s')}"
            bad.append(FieldViolation(flat("outliers", "max_ejection_s"), why))
        if self.min_requests < 1:
            bad.append(FieldViolation(flat("outliers", "min_requests"), "must be at least 1"))
        if not 0 < self.failure_rate <= 1:
            why = "must be above 0 and at most 1"
            bad.append(FieldViolation(flat("outliers", "failure_rate"), why))
        if not 0 <= self.max_ejected_percent <= 100:
            why = "must be 0 to 100"
            bad.append(FieldViolation(flat("outliers", "max_ejected_percent"), why))
        bad += [
            FieldViolation(flat("outliers", n), "must not be negative")
            for n in ("consecutive_failures", "ramp_s")
            if getattr(self, n) < 0
        ]
        return bad


@dataclass(frozen=True, kw_only=True)
class ServerTLSConfig:
    """TLS for clients -> router (``[router.tls]``, docs/tls.md); all "": plaintext."""

    cert: str = ""
    """PEM certificate (chain) the router presents; with ``key`` it speaks TLS only."""
    key: str = ""
    """PEM private key of ``cert`` (unencrypted)."""
    client_ca: str = ""
    """PEM CA file; set, mutual TLS: only clients presenting a certificate signed by this CA get
    through the handshake."""

    @functools.cached_property
    def loaded(self) -> ServerTLS | None:
        """The settings with their files read (once); None: plaintext."""
        if not (self.cert or self.key or self.client_ca):
            return None
        return ServerTLS(cert=self.cert, key=self.key, client_ca=self.client_ca, prefix="tls_")


@dataclass(frozen=True, kw_only=True)
class ReplicaTLSConfig:
    """TLS for router -> replicas (``[router.replica_tls]``); any setting turns it on."""

    ca: str = ""
    """PEM CA file that signed the replicas' certificates (unset: the system's roots)."""
    cert: str = ""
    """PEM client certificate for replicas that run mutual TLS (with ``key``)."""
    key: str = ""
    """PEM private key of ``cert`` (unencrypted)."""
    server_name: str = ""
    """Name to check every replica's certificate against, when replica addresses do not carry
    it (IP addresses, pod names); "" checks each address's host."""

    @functools.cached_property
    def loaded(self) -> ChannelTLS | None:
        """The settings with their files read (once); None: plaintext."""
        if not (self.ca or self.cert or self.key or self.server_name):
            return None
        return ChannelTLS(
            ca=self.ca,
            cert=self.cert,
            key=self.key,
            server_name=self.server_name,
            prefix="replica_tls_",
        )


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Settings of one router process: its own in ``[router]``, each part's in a sub-table."""

    host: str = "0.0.0.0"
    port: int = 50051
    policy: str = "least-busy"
    """``least-busy``, ``round-robin`` (kept for comparison), ``power-of-two`` or ``affinity``
    (docs/router.md, "Routing policies"); a catalog model's ``routing`` overrides it."""
    tokens_per_request: int = 256
    """Least-busy load = requests in flight + queued + tokens in flight / this: how many tokens
    still to generate weigh as much as one more request."""
    max_attempts: int = 3
    """Replicas tried for one request when a failure happens before its first token."""
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
    models: tuple[CatalogModel, ...] = ()
    """The model catalog (``[models.<id>]`` tables): what the router may place, and on how many."""
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    tls: ServerTLSConfig = field(default_factory=ServerTLSConfig)
    replica_tls: ReplicaTLSConfig = field(default_factory=ReplicaTLSConfig)

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> RouterConfig:
        """From nested settings as ``read_config_file`` returns them (sub-tables as mappings)."""
        values = dict(settings)
        for name, kind in SECTIONS.items():
            if isinstance(values.get(name), Mapping):
                values[name] = kind(**values[name])
        return cls(**values)

    @classmethod
    def from_flat(cls, settings: Mapping[str, Any]) -> RouterConfig:
        """From flat names, as the command line gives them (``FLAT_NAMES``)."""
        return cls.from_mapping(nest(settings))

    def validate(self) -> RouterConfig:
        bad: list[FieldViolation] = []
        for name in ("port", "health_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                bad.append(FieldViolation(name, f"{value} is out of range"))
        if self.policy not in POLICIES:
            bad.append(
                FieldViolation("policy", f"{self.policy!r} is not one of {', '.join(POLICIES)}")
            )
        bad += [
            FieldViolation(n, "must be at least 1")
            for n in ("tokens_per_request", "max_attempts")
            if getattr(self, n) < 1
        ]
        bad += _positive(self, "", "retry_after_s")
        if self.drain_grace_s < 0:
            bad.append(FieldViolation("drain_grace_s", "must not be negative"))
        bad += self._auth_violations()
        for part in (
            self.discovery,
            self.quota,
            self.placement,
            self.http,
            self.queue,
            self.outliers,
        ):
            bad += part.violations()
        if self.quota.store == "redis" or self.placement.share_counts or self.redis.configured:
            bad += self._redis_violations()
        for tls in (self.tls, self.replica_tls):
            try:
                _ = tls.loaded  # reads and checks the PEM files
            except InvalidArgument as e:
                bad.extend(e.field_violations)
        bad.extend(catalog_violations(self.models))
        if bad:
            raise invalid_fields("invalid router config", bad)
        return self

    def _auth_violations(self) -> list[FieldViolation]:
        if self.auth not in AUTH_MODES:
            return [FieldViolation("auth", f"{self.auth!r} is not one of {', '.join(AUTH_MODES)}")]
        if self.auth == "api-key" and not self.tenants_file:
            return [
                FieldViolation(
                    "tenants_file",
                    "is required with auth = 'api-key' "
                    "(or set auth = 'none' for local development)",
                )
            ]
        if self.auth == "none" and self.tenants_file:
            return [FieldViolation("tenants_file", "is ignored with auth = 'none': remove one")]
        return []

    def _redis_violations(self) -> list[FieldViolation]:
        if not self.redis.configured:
            users = [
                u
                for u, on in (
                    ("quota.store = 'redis'", self.quota.store == "redis"),
                    ("placement.share_counts", self.placement.share_counts),
                )
                if on
            ]
            return [
                FieldViolation(
                    flat("redis", "url"),
                    f"or redis_url_file is required with {' and '.join(users)}",
                )
            ]
        return self.redis.violations()


SECTIONS: dict[str, type[Any]] = {
    "discovery": DiscoveryConfig,
    "quota": QuotaConfig,
    "redis": RedisConfig,
    "placement": PlacementConfig,
    "http": HttpConfig,
    "queue": QueueConfig,
    "outliers": OutlierConfig,
    "tls": ServerTLSConfig,
    "replica_tls": ReplicaTLSConfig,
}
"""``[router.<name>]`` sub-tables and the config each becomes."""

FLAT_NAMES: dict[str, tuple[str, str]] = {
    **{
        n: ("discovery", n)
        for n in (
            "replicas",
            "replicas_file",
            "dns",
            "refresh_s",
            "report_interval_ms",
            "stale_after_s",
            "reconnect_max_s",
        )
    },
    "quota_store": ("quota", "store"),
    "redis_unavailable": ("quota", "unavailable"),
    "quota_lease_s": ("quota", "lease_s"),
    "redis_url": ("redis", "url"),
    "redis_url_file": ("redis", "url_file"),
    "redis_timeout_s": ("redis", "timeout_s"),
    **{n: ("placement", n) for n in ("load_timeout_s", "load_retry_s", "unload_drain_s")},
    "placement_refresh_s": ("placement", "refresh_s"),
    "share_placement_counts": ("placement", "share_counts"),
    "http_port": ("http", "port"),
    "http_max_body_bytes": ("http", "max_body_bytes"),
    "http_timeout_s": ("http", "timeout_s"),
    "fair_queue": ("queue", "enabled"),
    "replica_queue": ("queue", "replica_queue"),
    "queue_reserve": ("queue", "reserve"),
    **{f"queue_{n}": ("queue", n) for n in ("max_queued", "max_wait_s", "max_total")},
    "queue_share_interval_s": ("queue", "share_interval_s"),
    "outlier_ejection": ("outliers", "enabled"),
    **{
        f"outlier_{n}": ("outliers", n)
        for n in (
            "window_s",
            "min_requests",
            "failure_rate",
            "consecutive_failures",
            "base_ejection_s",
            "max_ejection_s",
            "max_ejected_percent",
            "ramp_s",
        )
    },
    **{f"tls_{n}": ("tls", n) for n in ("cert", "key", "client_ca")},
    **{f"replica_tls_{n}": ("replica_tls", n) for n in ("ca", "cert", "key", "server_name")},
}
"""Flat name (a command-line flag's) -> (sub-table, setting); other flat names are ``[router]``'s.
Errors name settings by these names."""
_FLAT = {place: name for name, place in FLAT_NAMES.items()}


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat settings into the nested shape of ``RouterConfig.from_mapping``."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        section, key = FLAT_NAMES.get(name, ("", name))
        if section:
            out.setdefault(section, {})[key] = value
        else:
            out[name] = value
    return out


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` (nested) on top of ``base`` (nested), one level of sub-tables deep."""
    out = dict(base)
    for name, value in overrides.items():
        if name in SECTIONS and isinstance(value, Mapping):
            out[name] = {**out.get(name, {}), **value}
        else:
            out[name] = value
    return out


def valid_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def read_config_file(path: Path) -> dict[str, Any]:
    """Nested settings from a TOML file: ``[router]`` and its sub-tables, names and types
    checked, and the ``[models.<id>]`` tables as the catalog (``models``)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"cannot read router config {path}: {e}") from e
    if unknown := sorted(set(data) - {"router", "models"}):
        raise InvalidArgument(
            f"{path}: unknown tables {', '.join(unknown)}; a router config "
            "has [router] (with its sub-tables) and [models.<id>] tables",
            field_violations=[FieldViolation(k, "unknown table") for k in unknown],
        )
    table = data.get("router", {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"{path}: [router] must be a table")
    table = _flat_keys_placed(path, table)
    settings = _typed(path, "router", table, RouterConfig, skip=set(SECTIONS))
    for name, kind in SECTIONS.items():
        if name in table:
            if not isinstance(table[name], dict):
                raise InvalidArgument(f"{path}: [router.{name}] must be a table")
            settings[name] = _typed(path, f"router.{name}", table[name], kind)
    if "models" in data:
        settings["models"] = parse_catalog(data["models"], str(path))
    return settings


def _flat_keys_placed(path: Path, table: Mapping[str, Any]) -> dict[str, Any]:
    """``[router]`` may also hold sub-table settings by their flat names (``stale_after_s``,
    ``quota_store``, ``tls_cert``: the layout before sub-tables, and the flags' names); each goes
    to its sub-table. The same setting given both ways is an error."""
    out = {
        k: (dict(v) if k in SECTIONS and isinstance(v, Mapping) else v) for k, v in table.items()
    }
    for name in [k for k in table if k in FLAT_NAMES]:
        section, key = FLAT_NAMES[name]
        sub = out.setdefault(section, {})
        if not isinstance(sub, dict) or key in sub:
            raise InvalidArgument(
                f"{path}: [router] {name} and [router.{section}] {key} are the same setting: set one",
                field_violations=[FieldViolation(name, "set twice")],
            )
        sub[key] = out.pop(name)
    return out


_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (float, int),
    "bool": (bool,),
    "int | None": (int,),
}
_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "int | None": "an integer",
    "tuple[str, ...]": "a list of strings",
}


def _typed(
    path: Path,
    where: str,
    table: Mapping[str, Any],
    kind: type[Any],
    skip: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    """One table's settings, each checked against the dataclass field of the same name."""
    types = {f.name: str(f.type) for f in fields(kind) if f.name not in skip and f.name != "models"}
    if unknown := sorted(set(table) - types.keys() - set(skip)):
        raise InvalidArgument(
            f"{path}: unknown [{where}] settings: {', '.join(unknown)}",
            field_violations=[FieldViolation(f"{where}.{k}", "unknown setting") for k in unknown],
        )
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        expected = types[key]
        if (
            expected == "tuple[str, ...]"
            and isinstance(value, list)
            and all(isinstance(v, str) for v in value)
        ):
            out[key] = tuple(value)
        elif (
            expected in _KINDS
            and isinstance(value, _KINDS[expected])
            and (expected == "bool" or not isinstance(value, bool))
        ):
            out[key] = float(cast(float, value)) if expected == "float" else value
        else:
            what = _TYPE_NAMES[expected]
            raise InvalidArgument(
                f"{path}: [{where}] {key} must be {what}, not {value!r}",
                field_violations=[FieldViolation(f"{where}.{key}", f"must be {what}")],
            )
    return out


def from_environment(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Nested settings the environment overrides (the one place the router reads MESHLLM_
    variables): MESHLLM_REDIS_URL sets ``redis.url``."""
    if url := os.environ.get(REDIS_URL_ENV):
        return merged(settings, {"redis": {"url": url}})
    return dict(settings)
