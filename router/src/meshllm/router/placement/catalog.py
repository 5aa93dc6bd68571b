"""The model catalog: which models the router may place on replicas, and how.

In a router config file each model is a ``[models.<id>]`` table next to ``[router]``::

    [models.demo]
    path = "demo"            # model folder on the replicas, or the built-in "demo" / "bench"
    desired_replicas = 2     # placed on idle replicas at start and whenever capacity appears
    max_replicas = 3         # the most that load / scale may ask for (0: no limit)

    routing = "affinity"     # its routing policy (default: the router's ``policy``)
    affinity_load_factor = 1.25

    [models.demo.options]    # engine-specific settings, as strings
    cache_size = "8192"

A catalog entry is a model spec (what a replica loads, ``meshllm.api.spec.ModelSpec``) plus the
router's placement settings; the table holds both side by side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from meshllm.api.errors import FieldViolation, invalid_fields
from meshllm.api.spec import ENGINES, SPEC_FIELDS, ModelSpec
from meshllm.router.affinity import AffinitySettings
from meshllm.router.balancer import POLICIES

DEVICES = ("", "cpu", "cuda")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$")


@dataclass(frozen=True, kw_only=True)
class CatalogModel:
    """One model the router may place."""

    spec: ModelSpec
    """What the replicas load (its ``id`` is the table's name)."""
    device: str = ""
    """Replicas it may go to: ``cpu``, ``cuda`` (any ``cuda:N``) or "" (any)."""
    desired_replicas: int = 0
    """Replicas the router keeps the model on: placed at start and whenever an idle replica
    appears; never removed automatically (unload and scale do that)."""
    max_replicas: int = 0
    """Most replicas ``load`` and ``scale`` may put it on (0: no limit)."""
    routing: str = ""
    """Its routing policy (``least-busy``, ``round-robin``, ``power-of-two``, ``affinity``);
    "": the router's ``policy``."""
    affinity_load_factor: float = 1.25
    """Affinity: a replica takes a key's requests while its load <= this x mean load + 1."""
    affinity_prefix_chars: int = 256
    """Affinity: characters of a text prompt hashed when no session key comes (0: none)."""
    affinity_prefix_tokens: int = 64
    """Affinity: token ids of a ``token_ids`` prompt hashed likewise (0: none)."""

    @classmethod
    def of(cls, **settings: Any) -> CatalogModel:
        """From one flat table (spec and placement settings side by side), as in a config file."""
        spec = {k: v for k, v in settings.items() if k in SPEC_FIELDS}
        placement = {k: v for k, v in settings.items() if k not in SPEC_FIELDS}
        return cls(spec=ModelSpec(**spec), **placement)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def affinity(self) -> AffinitySettings:
        return AffinitySettings(
            load_factor=self.affinity_load_factor,
            prefix_chars=self.affinity_prefix_chars,
            prefix_tokens=self.affinity_prefix_tokens,
        )

    def violations(self) -> list[FieldViolation]:
        where = f"models.{self.id}"
        spec = [v for v in self.spec.violations(where) if v.field != f"{where}.id"]
        required = [v for v in spec if v.description == "is required"]
        bad = (
            [FieldViolation(where, "id must be 1-128 letters, digits or ._/:- ")]
            if not _ID.match(self.id)
            else []
        )
        bad += required
        if self.spec.engine and self.spec.engine not in ENGINES:
            bad.append(
                FieldViolation(
                    f"{where}.engine", f"{self.spec.engine!r} is not one of {', '.join(ENGINES)}"
                )
            )
        if self.device not in DEVICES:
            bad.append(
                FieldViolation(f"{where}.device", f"{self.device!r} is not 'cpu', 'cuda' or ''")
            )
        bad += [v for v in spec if v not in required]
        for name in ("desired_replicas", "max_replicas"):
            if getattr(self, name) < 0:
                bad.append(FieldViolation(f"{where}.{name}", "must not be negative"))
        if self.max_replicas and self.desired_replicas > self.max_replicas:
            bad.append(
                FieldViolation(
                    f"{where}.desired_replicas",
                    f"{self.desired_replicas} is above max_replicas {self.max_replicas}",
                )
            )
        if self.routing and self.routing not in POLICIES:
            bad.append(
                FieldViolation(
                    f"{where}.routing", f"{self.routing!r} is not one of {', '.join(POLICIES)}"
                )
            )
        return bad + self.affinity.violations(f"{where}.")

    def fits(self, device: str) -> bool:
        """May go to a replica on ``device`` (``cpu``, ``cuda:0``, ...)."""
        return not self.device or device.partition(":")[0] == self.device

    def within_limit(self, replicas: int) -> bool:
        return not self.max_replicas or replicas <= self.max_replicas

    def with_overrides(self, overrides: Mapping[str, Any]) -> CatalogModel:
        """This model with one-off spec changes (``load --set``): set fields replace the
        catalog's, options are merged; the result is validated."""
        changes = {k: v for k, v in overrides.items() if v not in ("", 0, None, {})}
        if "options" in changes:
            changes["options"] = {**self.spec.options, **changes["options"]}
        model = replace(self, spec=replace(self.spec, **changes))
        if bad := model.violations():
            raise invalid_fields("invalid overrides", bad)
        return model


_FIELD_TYPES = {**SPEC_FIELDS, **{f.name: str(f.type) for f in fields(CatalogModel)}}


def parse_catalog(tables: Mapping[str, Any], source: str = "config") -> tuple[CatalogModel, ...]:
    """``[models.<id>]`` tables into catalog entries; any mistake names its field."""
    if not isinstance(tables, Mapping):
        raise invalid_fields(
            source, [FieldViolation("models", "must be a table of [models.<id>] tables")]
        )
    out, bad = [], list[FieldViolation]()
    for model_id, table in tables.items():
        where = f"models.{model_id}"
        if not isinstance(table, Mapping):
            bad.append(FieldViolation(where, "must be a table"))
            continue
        settings: dict[str, Any] = {"id": model_id}
        for key, value in table.items():
            if problem := _check(key, value):
                bad.append(FieldViolation(f"{where}.{key}", problem))
            else:
                settings[key] = dict(value) if key == "options" else value
        if not any(v.field.startswith(f"{where}.") for v in bad):
            if "path" not in settings:
                bad.append(FieldViolation(f"{where}.path", "is required"))
                continue
            model = CatalogModel.of(**settings)
            bad += model.violations()
            out.append(model)
    if bad:
        raise invalid_fields(f"invalid model catalog in {source}", bad)
    return tuple(out)


def _check(key: str, value: Any) -> str:
    """What is wrong with one catalog setting ("" when nothing)."""
    kind = _FIELD_TYPES.get(key)
    if kind is None or key in ("id", "spec"):
        return "comes from the table name; remove it" if key == "id" else "unknown setting"
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be an integer"
    if kind == "str" and not isinstance(value, str):
        return "must be a string"
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "must be a number"
    if key == "options" and not (
        isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values())
    ):
        return 'must be a table of strings, e.g. options = { cache_size = "8192" }'
    return ""


def catalog_violations(models: tuple[CatalogModel, ...]) -> list[FieldViolation]:
    """Problems of the catalog as a whole (also for one built in code rather than parsed)."""
    bad = [v for m in models for v in m.violations()]
    seen = set[str]()
    for m in models:
        if m.id in seen:
            bad.append(FieldViolation(f"models.{m.id}", "appears twice"))
        seen.add(m.id)
    return bad
