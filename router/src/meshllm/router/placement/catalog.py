"""The model catalog: which models the router may place on replicas, and how.

In a router config file each model is a ``[models.<id>]`` table next to ``[router]``::

    [models.demo]
    path = "demo"            # model folder on the replicas, or the built-in "demo" / "bench"
    desired_replicas = 2     # placed on idle replicas at start and whenever capacity appears
    max_replicas = 3         # the most that load / scale may ask for (0: no limit)

    [models.demo.options]    # engine-specific settings, as strings
    cache_size = "8192"
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from meshllm.api.errors import FieldViolation, invalid_fields

ENGINES = ("ctranslate2", "exllamav3", "fake")
"""Engine names a replica knows (pinned against the replica's registry by a test)."""
DEVICES = ("", "cpu", "cuda")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$")
_SPEC_INTS = ("context_length", "default_max_tokens", "max_tokens_limit", "max_batch_size",
              "inter_threads", "intra_threads", "max_queued")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class CatalogModel:
    """One model the router may place; 0 / "" mean "the engine's or the model's default"."""

    id: str
    """Id clients use in ``GenerateRequest.model`` (the table's name)."""
    path: str
    """Model folder as the replicas see it, or ``demo`` / ``bench`` (generated on first use)."""
    engine: str = "ctranslate2"
    device: str = ""
    """Replicas it may go to: ``cpu``, ``cuda`` (any ``cuda:N``) or "" (any)."""
    compute_type: str = ""
    """Engine-specific numeric format, e.g. ``int8``, ``float16``."""
    context_length: int = 0
    default_max_tokens: int = 0
    max_tokens_limit: int = 0
    max_batch_size: int = 0
    """Requests per engine batch."""
    inter_threads: int = 0
    """Batches running in parallel on one replica."""
    intra_threads: int = 0
    """Threads per batch."""
    max_queued: int = 0
    chat_template: str = ""
    """Jinja chat template replacing the one in the model's tokenizer_config.json."""
    options: Mapping[str, str] = field(default_factory=dict)
    """Engine-specific settings (e.g. ExLlamaV3 ``cache_size``)."""
    desired_replicas: int = 0
    """Replicas the router keeps the model on: placed at start and whenever an idle replica
    appears; never removed automatically (unload and scale do that)."""
    max_replicas: int = 0
    """Most replicas ``load`` and ``scale`` may put it on (0: no limit)."""

    def violations(self) -> list[FieldViolation]:
        where, bad = f"models.{self.id}", list[FieldViolation]()
        if not _ID.match(self.id):
            bad.append(FieldViolation(where, "id must be 1-128 letters, digits or ._/:- "))
        if not self.path:
            bad.append(FieldViolation(f"{where}.path", "is required"))
        if self.engine not in ENGINES:
            bad.append(FieldViolation(f"{where}.engine", f"{self.engine!r} is not one of {', '.join(ENGINES)}"))  # fmt: skip
        if self.device not in DEVICES:
            bad.append(FieldViolation(f"{where}.device", f"{self.device!r} is not 'cpu', 'cuda' or ''"))  # fmt: skip
        for name in (*_SPEC_INTS, "desired_replicas", "max_replicas"):
            if getattr(self, name) < 0:
                bad.append(FieldViolation(f"{where}.{name}", "must not be negative"))
        if self.max_replicas and self.desired_replicas > self.max_replicas:
            bad.append(FieldViolation(f"{where}.desired_replicas", f"{self.desired_replicas} is above max_replicas {self.max_replicas}"))  # fmt: skip
        if self.max_tokens_limit and self.default_max_tokens > self.max_tokens_limit:
            bad.append(FieldViolation(f"{where}.default_max_tokens", "is above max_tokens_limit"))
        return bad

    def fits(self, device: str) -> bool:
        """May go to a replica on ``device`` (``cpu``, ``cuda:0``, ...)."""
        return not self.device or device.partition(":")[0] == self.device

    def within_limit(self, replicas: int) -> bool:
        return not self.max_replicas or replicas <= self.max_replicas

    def with_overrides(self, overrides: Mapping[str, Any]) -> CatalogModel:
        """This model with one-off changes (``load --set``): set fields replace the catalog's,
        options are merged; the result is validated."""
        changes = {k: v for k, v in overrides.items() if v not in ("", 0, None, {})}
        if "options" in changes:
            changes["options"] = {**self.options, **changes["options"]}
        model = replace(self, **changes)
        if bad := model.violations():
            raise invalid_fields("invalid overrides", bad)
        return model


_FIELD_TYPES = {f.name: f.type for f in fields(CatalogModel)}


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
            problem = _check(key, value)
            if problem:
                bad.append(FieldViolation(f"{where}.{key}", problem))
            else:
                settings[key] = dict(value) if key == "options" else value
        if not any(v.field.startswith(f"{where}.") for v in bad):
            if "path" not in settings:
                bad.append(FieldViolation(f"{where}.path", "is required"))
                continue
            model = CatalogModel(**settings)
            bad += model.violations()
            out.append(model)
    if bad:
        raise invalid_fields(f"invalid model catalog in {source}", bad)
    return tuple(out)


def _check(key: str, value: Any) -> str:
    """What is wrong with one catalog setting ("" when nothing)."""
    kind = _FIELD_TYPES.get(key)
    if kind is None or key == "id":
        return "unknown setting" if key != "id" else "comes from the table name; remove it"
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return "must be an integer"
    if kind == "str" and not isinstance(value, str):
        return "must be a string"
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
