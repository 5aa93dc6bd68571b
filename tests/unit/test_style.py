"""Structure rules the formatter and linters cannot see (STYLE.md habits 13 and 15)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from meshllm.api.spec import ModelSpec
from meshllm.api.v1 import replica_control_pb2 as rc

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = [ROOT / part / "src" for part in ("protos", "server", "client", "router", "replica")]
MAX_FMT_SKIPS = 20
"""``# fmt: skip`` only on data tables whose alignment carries meaning."""


def library_files() -> list[Path]:
    return [p for src in LIBRARY for p in src.rglob("*.py") if "_pb2" not in p.name]


def test_the_formatter_formats_library_code() -> None:
    skips = {str(p.relative_to(ROOT)): p.read_text().count("# fmt: skip") for p in library_files()}
    assert sum(skips.values()) <= MAX_FMT_SKIPS, {k: v for k, v in skips.items() if v}


def test_each_shared_domain_type_is_defined_once() -> None:
    shared = (
        "ModelSpec",
        "ReplicaState",
        "LoadReport",
        "FinishReason",
        "Usage",
        "Timing",
        "ModelInfo",
        "DeviceMemory",
        "ReplicaStatus",
        "QuotaUsage",
    )
    found = {
        name: [
            str(p.relative_to(ROOT))
            for p in library_files()
            if re.search(rf"^class {name}\b", p.read_text(), re.M)
        ]
        for name in shared
    }
    assert {k: len(v) for k, v in found.items()} == dict.fromkeys(shared, 1), found


def test_the_model_spec_has_the_wire_fields() -> None:
    """Adding a spec field touches the proto and ``meshllm.api.spec``: conversion is generic."""
    assert sorted(f.name for f in fields(ModelSpec)) == sorted(
        f.name for f in rc.ModelSpec.DESCRIPTOR.fields
    )
