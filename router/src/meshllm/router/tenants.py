"""Tenants and their API keys, from a TOML file (a config file or a mounted Secret).

Keys are stored hashed: the file holds ``sha256:<hex>`` of each key, never the key itself
(``meshllm-router hash-key`` prints the line to add)::

    [[tenants]]
    name = "research"
    role = "user"                 # or "admin": may call the Admin service
    keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    requests_per_minute = 600     # every limit is optional; absent means unlimited
    tokens_per_minute = 200000
    concurrent_requests = 32
    tokens_per_day = 20000000
    max_priority = 0              # highest request priority it may ask for (default 0: normal)
    weight = 1.0                  # its share of a saturated model against other waiting tenants
    max_queued = 256              # its requests that may wait in the router's queue at once
    max_queue_wait_s = 30.0       # longest one may wait there before RESOURCE_EXHAUSTED
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshllm.api.errors import FieldViolation, InvalidArgument
from meshllm.router.quota.limits import LIMITS, TenantLimits

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HASH = re.compile(r"sha256:([0-9a-f]{64})")
QUEUE_FIELDS = ("weight", "max_queued", "max_queue_wait_s")
TENANT_FIELDS = frozenset({"name", "role", "keys", "max_priority", *QUEUE_FIELDS, *LIMITS})
"""The settings of one ``[[tenants]]`` entry (the Helm chart's schema lists the same)."""
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
"""``GenerateRequest.priority`` is an int32."""


class Role(enum.Enum):
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True, kw_only=True)
class Tenant:
    name: str
    role: Role
    limits: TenantLimits
    key_digests: tuple[bytes, ...] = ()
    """SHA-256 digests of the tenant's API keys."""
    max_priority: int = 0
    """The highest ``priority`` its requests may ask for (higher is INVALID_ARGUMENT): by
    default none may jump ahead of normal (0) work; any tenant may ask for less."""
    weight: float = 1.0
    """Its share when a model's replicas are saturated: waiting tenants get tokens in
    proportion to their weights (docs/router.md, "Fair sharing")."""
    max_queued: int | None = None
    """Its requests that may wait in the router's queue at once (None: ``[router.queue]``'s)."""
    max_queue_wait_s: float | None = None
    """Longest one of its requests may wait there (None: ``[router.queue]``'s)."""


ANONYMOUS = Tenant(
    name="anonymous", role=Role.ADMIN, limits=TenantLimits(), max_priority=PRIORITY_RANGE[1]
)
"""Every caller when authentication is disabled (local development only)."""


def is_tenant_name(name: str) -> bool:
    """Whether ``name`` may name a tenant: 1-63 letters, digits, '.', '_' or '-', not starting
    with '.', '_' or '-'."""
    return _NAME.fullmatch(name) is not None


def hash_key(key: str) -> str:
    """The line to store for ``key`` in a tenants file."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh API key: 256 random bits."""
    return "mk-" + secrets.token_urlsafe(32)


def load_tenants(path: Path) -> tuple[Tenant, ...]:
    """Every tenant in the file; any mistake is an InvalidArgument naming the field."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgument(f"cannot read tenants file {path}: {e}") from e
    entries = data.get("tenants", [])
    if set(data) - {"tenants"} or not isinstance(entries, list):
        raise _bad(path, "tenants", "the file holds only [[tenants]] tables")
    tenants = tuple(_tenant(path, i, entry) for i, entry in enumerate(entries))
    _check_unique(path, tenants)
    return tenants


def _tenant(path: Path, i: int, entry: Any) -> Tenant:
    where = f"tenants[{i}]"
    if not isinstance(entry, dict):
        raise _bad(path, where, "must be a table")
    if unknown := sorted(set(entry) - TENANT_FIELDS):
        raise _bad(
            path,
            f"{where}.{unknown[0]}",
            f"unknown setting (known: {', '.join(sorted(TENANT_FIELDS))})",
        )
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(path, f"{where}.name", "must be 1-63 letters, digits, '.', '_' or '-'")
    role = entry.get("role", "user")
    if role not in {r.value for r in Role}:
        raise _bad(path, f"{where}.role", f"{role!r} is not 'user' or 'admin'")
    keys = entry.get("keys")
    if not isinstance(keys, list) or not keys:
        raise _bad(path, f"{where}.keys", "must list at least one 'sha256:<hex>' key hash")
    digests = tuple(_digest(path, f"{where}.keys[{j}]", key) for j, key in enumerate(keys))
    limits: dict[str, int] = {}
    for limit in LIMITS:
        value = entry.get(limit)
        if value is not None and (type(value) is not int or value < 1):
            raise _bad(
                path, f"{where}.{limit}", "must be a positive integer (leave it out for no limit)"
            )
        if value is not None:
            limits[limit] = value
    ceiling = entry.get("max_priority", 0)
    low, high = PRIORITY_RANGE
    if type(ceiling) is not int or not low <= ceiling <= high:
        raise _bad(path, f"{where}.max_priority", f"must be an integer from {low} to {high}")
    return Tenant(
        name=name,
        role=Role(role),
        limits=TenantLimits(**limits),
        key_digests=digests,
        max_priority=ceiling,
        **_queue_settings(path, where, entry),
    )


def _queue_settings(path: Path, where: str, entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in QUEUE_FIELDS:
        value = entry.get(name)
        if value is None:
            continue
        integer = name == "max_queued"
        kinds = (int,) if integer else (int, float)
        if type(value) not in kinds or value <= 0:
            what = "a positive integer" if integer else "a positive number"
            raise _bad(path, f"{where}.{name}", f"must be {what}")
        out[name] = value if integer else float(value)
    return out


def _digest(path: Path, where: str, key: Any) -> bytes:
    match = _HASH.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise _bad(
            path,
            where,
            "must be 'sha256:<64 lowercase hex digits>': store the key's hash, "
            "never the key (meshllm-router hash-key prints it)",
        )
    return bytes.fromhex(match.group(1))


def _check_unique(path: Path, tenants: tuple[Tenant, ...]) -> None:
    names: set[str] = set()
    digests: set[bytes] = set()
    for i, t in enumerate(tenants):
        if t.name in names:
            raise _bad(path, f"tenants[{i}].name", f"{t.name!r} appears twice")
        if digests & set(t.key_digests):
            raise _bad(path, f"tenants[{i}].keys", "a key hash already belongs to another tenant")
        names.add(t.name)
        digests.update(t.key_digests)


def _bad(path: Path, field: str, problem: str) -> InvalidArgument:
    return InvalidArgument(
        f"{path}: {field} {problem}", field_violations=[FieldViolation(field, problem)]
    )
