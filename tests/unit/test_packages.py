"""Distribution boundaries: the client installs and imports without server, router, replica or
engine code, and no distribution depends on one that depends back on it."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BLOCKED = (
    "prometheus_client",
    "meshllm.server",
    "meshllm.router",
    "meshllm.replica",
    "ctranslate2",
)

CLIENT_ONLY = f"""
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            raise ImportError(f"blocked: {{name}}")
        return None

sys.meta_path.insert(0, Blocked())

import asyncio
import meshllm.client
import meshllm.client.cli
import meshllm.client.demo
import meshllm.client.local
from meshllm.client import AdminClient, AsyncAdminClient, AsyncClient, Client

with Client("127.0.0.1:1", timeout=1) as client, AdminClient("127.0.0.1:1") as admin:
    pass

async def main():
    async with AsyncClient("127.0.0.1:1"), AsyncAdminClient("127.0.0.1:1"):
        pass

asyncio.run(main())
meshllm.client.cli._parser().parse_args(["generate", "hi", "--model", "demo"])
print("imported", sorted(m for m in sys.modules if m.startswith("meshllm.")))
"""


def python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )


def test_the_client_imports_and_runs_with_server_router_replica_and_engines_blocked() -> None:
    done = python(CLIENT_ONLY)
    assert done.returncode == 0, done.stderr
    assert "meshllm.client.local" in done.stdout
    for name in ("meshllm.server", "meshllm.router", "meshllm.replica"):
        assert f"'{name}" not in done.stdout


def test_the_blocker_itself_blocks() -> None:
    """The script above can fail: the same finder refuses a router import."""
    script = CLIENT_ONLY.replace("import asyncio\n", "import asyncio\nimport meshllm.router\n", 1)
    done = python(script)
    assert done.returncode != 0 and "blocked: meshllm.router" in done.stderr


def requirement_names(distribution: str) -> set[str]:
    """Every distribution ``distribution`` may pull in (its extras' too), normalized."""
    names = set()
    for requirement in importlib.metadata.requires(distribution) or ():
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        assert match is not None, requirement
        names.add(re.sub(r"[._]+", "-", match.group(0)).lower())
    return names


@pytest.mark.parametrize("distribution", ["meshllm-client", "meshllm-api"])
def test_client_distributions_require_no_server_side_package(distribution: str) -> None:
    server_side = {"prometheus-client", "meshllm-server", "meshllm-router", "meshllm-replica"}
    assert requirement_names(distribution) & server_side == set()


def test_the_router_does_not_require_the_client() -> None:
    """``meshllm up`` (the client) starts routers; the router never imports the client."""
    assert "meshllm-api" in requirement_names("meshllm-router")
    assert "meshllm-client" not in requirement_names("meshllm-router")


def make_dry_run(target: str) -> str:
    """Every command ``make TARGET`` would run from nothing (-B: all out of date; -n: run none)."""
    done = subprocess.run(
        ["make", "-n", "-B", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


TEST_ONLY = ("--group dev", "--group helm-tools", "apt-get", "npm ci", "[tracing]")
"""What only the tests need: the dev tools, checkov's venv, redis-server (root), buf, tracing."""


def test_make_demo_installs_only_what_the_mesh_needs() -> None:
    commands = make_dry_run("demo")
    assert "-m meshllm.client.demo" in commands
    assert '-e ./protos -e ./server -e ./client -e ./router -e "./replica[ctranslate2]"' in commands
    assert [what for what in TEST_ONLY if what in commands] == []


def test_make_setup_still_installs_everything_the_tests_need() -> None:
    commands = make_dry_run("setup")
    assert [what for what in TEST_ONLY if what not in commands] == []


@pytest.mark.parametrize("part", ["protos", "server", "client", "router", "replica"])
def test_every_part_ships_the_repository_licence(part: str) -> None:
    """Each part's LICENSE is a copy (a build cannot reach above its folder) of the same text."""
    licence = ROOT / part / "LICENSE"
    assert not licence.is_symlink()
    assert licence.read_bytes() == (ROOT / "LICENSE").read_bytes()
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
