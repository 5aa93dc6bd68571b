"""A whole mesh on one machine: N replica processes and a router in front (``meshllm up``).

Every part is a real process speaking real gRPC, as in a deployment (``python -m
meshllm.router``, ``python -m meshllm.replica``: the client imports neither, so the router and
replica packages need only be installed to run them); each child runs in its own
session so that Ctrl-C reaches only this supervisor, which then stops the router first (its
in-flight streams finish) and the replicas after it. On Linux the children also get SIGTERM if
the supervisor itself is killed.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from meshllm.api.errors import MeshError
from meshllm.api.types import ReplicaState, ReplicaStatus
from meshllm.client._admin import AdminClient
from meshllm.client._sync import Client


@dataclass(frozen=True, kw_only=True)
class LocalMeshConfig:
    """A mesh for one machine, listening on loopback by default. Without a tenants file the
    router runs with authentication disabled (``--no-auth``): local development."""

    replicas: int = 2
    """Replica processes to start; they start idle and the router places models on them."""
    model: str = "smollm2"
    """Without ``config``: the one catalog model, put on every replica: ``smollm2`` (the real
    built-in model), ``demo`` or ``bench`` (generated, random weights) or a model folder."""
    config: str = ""
    """A router config file whose ``[models.<id>]`` catalog (and ``[router]`` settings) the
    router uses; the mesh's own address, replicas and auth flags override it."""
    host: str = "127.0.0.1"
    port: int = 50051
    """The router's port (0 picks a free one)."""
    http_port: int | None = 0
    """The router's OpenAI-compatible HTTP port (0 picks a free one; None: off)."""
    policy: str = "least-busy"
    replica_args: tuple[str, ...] = ()
    """Extra ``meshllm-replica`` flags, e.g. ``("--inter-threads", "1")``."""
    log_level: str = "WARNING"
    ready_timeout_s: float = 120.0
    tenants_file: str = ""
    """API keys and quotas for the router (docs/quotas.md); empty: no authentication."""
    api_key: str = ""
    """A key from ``tenants_file``, to check that the mesh is ready."""

    def validate(self) -> LocalMeshConfig:
        if self.tenants_file and not self.api_key:
            raise ValueError("api_key: a key from the tenants file is needed to see the mesh ready")
        if self.replicas < 1:
            raise ValueError(f"replicas: need at least 1, got {self.replicas}")
        for name in ("port", "http_port"):
            if (value := getattr(self, name)) is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name}: {value} is out of range")
        return self


@dataclass(frozen=True, kw_only=True)
class CatalogEntry:
    """What the mesh needs of one ``[models.<id>]`` table of the router's config: which model,
    and on how many replicas the router puts it at start (the router reads the rest)."""

    id: str
    desired_replicas: int = 0


def read_catalog(path: Path) -> tuple[CatalogEntry, ...]:
    """The ``[models.<id>]`` tables of a router config file; ValueError names a bad one (the
    router checks every other setting when it starts)."""
    with path.open("rb") as f:
        tables = tomllib.load(f).get("models", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{path}: models must be a table of [models.<id>] tables")
    out = []
    for model_id, table in tables.items():
        desired = table.get("desired_replicas", 0) if isinstance(table, dict) else None
        if not isinstance(desired, int) or isinstance(desired, bool) or desired < 0:
            raise ValueError(
                f"{path}: models.{model_id}.desired_replicas must be a whole number >= 0"
            )
        out.append(CatalogEntry(id=model_id, desired_replicas=desired))
    return tuple(out)


def load_failures(replicas: Sequence[ReplicaStatus], placed: int) -> str | None:
    """Why the mesh cannot become ready, once as many replicas have failed their load as the
    catalog places at start (None while it still may): each distinct error, with where."""
    failed = [r for r in replicas if r.state is ReplicaState.FAILED]
    if not failed or len(failed) < placed:
        return None
    where: dict[str, list[str]] = {}
    for r in failed:
        where.setdefault(r.error or "no reason given", []).append(r.replica_id)
    reasons = "; ".join(f"{error} ({', '.join(ids)})" for error, ids in where.items())
    return f"every replica's load failed: {reasons}"


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM (and drain) when the supervisor dies, even by
    SIGKILL, so a killed ``meshllm up`` leaves no orphans (Linux ``PR_SET_PDEATHSIG``). The
    mesh is spawned before this process starts any thread, as ``preexec_fn`` requires."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (another process could take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class LocalMesh:
    """Start with ``with LocalMesh(config) as mesh:``; ``mesh.address`` is the router."""

    def __init__(self, config: LocalMeshConfig) -> None:
        self.config = config.validate()
        self.replicas: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.router: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.http_url = ""
        """The OpenAI-compatible API's base URL (``http://host:port/v1``); "" when off."""
        self.catalog: tuple[CatalogEntry, ...] = ()
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> LocalMesh:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def _spawn(self, module: str, *args: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", module, "--log-level", self.config.log_level, *args]
        return subprocess.Popen(
            cmd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 (no threads yet)
        )

    def start(self) -> str:
        c = self.config
        config_file = self._router_config()
        for i in range(c.replicas):
            address = f"{c.host}:{free_port(c.host)}"
            proc = self._spawn(
                "meshllm.replica",
                "--host",
                c.host,
                "--port",
                address.rsplit(":", 1)[1],
                "--replica-id",
                f"replica-{i}",
                *c.replica_args,
            )
            self.replicas.append((address, proc))
        port = c.port or free_port(c.host)
        replica_flags = [flag for address, _ in self.replicas for flag in ("--replica", address)]
        http: tuple[str, ...] = ()
        if c.http_port is not None:
            http_port = c.http_port or free_port(c.host)
            http = ("--http-port", str(http_port))
            self.http_url = f"http://{c.host}:{http_port}/v1"
        self.router = self._spawn(
            "meshllm.router",
            "--config",
            str(config_file),
            "--host",
            c.host,
            "--port",
            str(port),
            "--policy",
            c.policy,
            *self._auth_flags(),
            *http,
            *replica_flags,
        )
        self.address = f"{c.host}:{port}"
        self._wait_ready()
        return self.address

    def _router_config(self) -> Path:
        """The router's config file: the given one, or a catalog of the one model on every replica."""
        if self.config.config:
            path = Path(self.config.config).resolve()
            self.catalog = read_catalog(path)
            return path
        model = self.config.model
        model_id = Path(model).name  # as the replica names it: "demo" for demo, a folder's name
        self._dir = tempfile.TemporaryDirectory(prefix="meshllm-up-")
        path = Path(self._dir.name) / "router.toml"
        path.write_text(
            f"[models.{json.dumps(model_id)}]\npath = {json.dumps(model)}\n"
            f"desired_replicas = {self.config.replicas}\n"
        )
        self.catalog = read_catalog(path)
        return path

    def _auth_flags(self) -> tuple[str, ...]:
        tenants = self.config.tenants_file
        return ("--tenants-file", str(Path(tenants).resolve())) if tenants else ("--no-auth",)

    def _children(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        router = [("router", self.router)] if self.router is not None else []
        return [*router, *((f"replica {a}", p) for a, p in self.replicas)]

    def exited(self) -> str | None:
        """The first child that is no longer running, described; None while all run."""
        for name, proc in self._children():
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def _wait_ready(self) -> None:
        """Until the router serves the catalog's models on as many replicas as it places them
        on at start (a built-in model is generated on first use); a RuntimeError with the
        reason as soon as those loads have all failed."""
        deadline = time.monotonic() + self.config.ready_timeout_s
        placed = min(sum(m.desired_replicas for m in self.catalog), self.config.replicas)
        key = self.config.api_key or None
        with (
            Client(self.address, api_key=key, timeout=2.0) as client,
            AdminClient(self.address, api_key=key, timeout=2.0) as admin,
        ):
            while time.monotonic() < deadline:
                if (gone := self.exited()) is not None:
                    raise RuntimeError(f"the local mesh did not start: {gone}")
                try:
                    if sum(m.ready_replicas for m in client.list_models()) >= placed:
                        return
                    if (failed := load_failures(admin.list_replicas(), placed)) is not None:
                        raise RuntimeError(f"the local mesh did not start: {failed}")
                except MeshError:  # not up yet, or a key without the admin role
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"the local mesh was not ready after {self.config.ready_timeout_s:.0f}s")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the router (in-flight streams finish), then the replicas; SIGKILL stragglers."""
        if self.router is not None:
            stop_processes([self.router], timeout_s)
        stop_processes([p for _, p in self.replicas], timeout_s)
        if self._dir is not None:
            self._dir.cleanup()


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM to all (they drain in parallel), then SIGKILL to any still running after
    ``timeout_s``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def up(config: LocalMeshConfig) -> int:
    """``meshllm up``: start the mesh, print its address, run until Ctrl-C (or SIGTERM), stop it
    all. Returns the exit status: 1 if a part of the mesh died on its own."""
    for sig in (
        signal.SIGTERM,
        signal.SIGINT,
    ):  # SIGINT too: a background job starts with it ignored
        signal.signal(sig, _interrupt)
    what = config.config or f"{config.model!r} on each"
    print(f"starting {config.replicas} replicas and a router ({what}) ...", flush=True)
    gone = None
    try:
        with LocalMesh(config) as mesh:
            replicas = ", ".join(a for a, _ in mesh.replicas)
            print(f"meshllm is up: router at {mesh.address} (replicas: {replicas})")
            key = ' --api-key "$KEY"' if config.tenants_file else ""
            model = mesh.catalog[0].id if mesh.catalog else config.model
            print(f'try:  meshllm --target {mesh.address}{key} generate "Hello" --model {model}')
            print(f"      meshllm --target {mesh.address}{key} admin models")
            if mesh.http_url:
                print(f"OpenAI-compatible API at {mesh.http_url} (docs/http.md):")
                auth = ' -H "Authorization: Bearer $KEY"' if config.tenants_file else ""
                body = (
                    f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'
                )
                print(f"      curl {mesh.http_url}/chat/completions{auth} -d '{body}'")
            print("Ctrl-C stops the mesh.", flush=True)
            while (gone := mesh.exited()) is None:
                time.sleep(0.5)
            print(f"stopping the mesh: {gone}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # LocalMesh.__exit__ (or __enter__ on the way up) stopped it all
        pass
    print("stopped.", flush=True)
    return 0 if gone is None else 1
