"""Distribution boundaries: the client installs and imports without server, router, replica or
engine code, and no distribution depends on one that depends back on it."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

import pytest

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
