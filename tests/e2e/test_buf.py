"""buf lint and buf breaking (protos/buf.py) on the real protos: clean now, and a breaking edit is
caught. buf is npm's @bufbuild/buf, installed by ``make setup`` into protos/node_modules."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "protos" / "node_modules" / ".bin" / "buf"

pytestmark = pytest.mark.skipif(
    not BUF.exists(), reason="buf is not installed: make setup (npm ci --prefix protos)"
)


def buf_py(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "protos" / "buf.py"), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_buf_lint_is_clean() -> None:
    done = buf_py("lint")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "buf lint: clean" in done.stdout


def test_buf_breaking_finds_nothing_against_the_base_commit() -> None:
    done = buf_py("breaking")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no breaking change" in done.stdout


def test_buf_breaking_catches_a_changed_field_type(tmp_path: Path) -> None:
    """The same check on a copy whose max_tokens changed type fails and names the field."""
    old = tmp_path / "old"
    new = tmp_path / "new"
    for folder in (old, new):
        shutil.copytree(ROOT / "protos" / "meshllm", folder / "meshllm")
    shutil.copy(ROOT / "protos" / "buf.yaml", new / "buf.yaml")
    proto = new / "meshllm" / "api" / "v1" / "generation.proto"
    text = proto.read_text()
    assert "optional uint32 max_tokens = " in text
    proto.write_text(text.replace("optional uint32 max_tokens = ", "optional uint64 max_tokens = "))
    done = subprocess.run(
        [str(BUF), "breaking", "--against", str(old)],
        cwd=new,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode != 0
    assert 'name "max_tokens"' in done.stdout and 'from "uint32" to "uint64"' in done.stdout


def test_buf_lint_catches_a_bad_field_name(tmp_path: Path) -> None:
    new = tmp_path / "new"
    shutil.copytree(ROOT / "protos" / "meshllm", new / "meshllm")
    shutil.copy(ROOT / "protos" / "buf.yaml", new / "buf.yaml")
    proto = new / "meshllm" / "api" / "v1" / "generation.proto"
    proto.write_text(proto.read_text().replace(" max_tokens = ", " maxTokens = ", 1))
    done = subprocess.run(
        [str(BUF), "lint"], cwd=new, capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode != 0 and "maxTokens" in done.stdout
