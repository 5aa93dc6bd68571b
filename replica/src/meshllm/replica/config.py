"""Replica configuration: frozen dataclasses, validated once with errors that name the field."""

from __future__ import annotations

import functools
import re
import socket
from dataclasses import dataclass

from meshllm.api.errors import FieldViolation, InvalidArgument
from meshllm.api.spec import ModelSpec
from meshllm.api.tls import ServerTLS

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True, kw_only=True)
class ReplicaConfig:
    """Settings of one replica process."""

    host: str = "0.0.0.0"
    port: int = 50061
    device: str = "cpu"
    """``cpu`` or ``cuda:N``: the one device this replica uses."""
    replica_id: str = ""
    """Name in load reports and timing metrics (default: hostname:port)."""
    model: ModelSpec | None = None
    """Loaded at start; None leaves the replica idle until ReplicaControl.LoadModel."""
    drain_grace_s: float = 30.0
    """On SIGTERM or unload, how long in-flight requests may finish before being cancelled."""
    report_interval_ms: int = 500
    metrics_port: int | None = None
    """HTTP port of the Prometheus ``/metrics`` endpoint (0: a free port; None: off)."""
    health_port: int | None = None
    """A plaintext port answering only ``grpc.health.v1`` (0: a free port; None: off), for
    probes that cannot speak TLS when the main port does (kubelet gRPC probes)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request accepted; bigger ones get RESOURCE_EXHAUSTED from gRPC itself."""
    max_input_chars: int = 1_000_000
    batch_window_ms: float = 2.0
    default_coalesce_ms: int = 10
    """For requests without stream_options: how long a chunk may hold tokens (the first token is
    never held). Sending one message per token costs more CPU than generating it on small models."""
    engine_process: bool = True
    """Run the engine in a process of its own (the model, batching, device), so its Python and
    this process's gRPC work hold two GILs, not one; a crashed engine fails its requests and
    sets the replica FAILED instead of taking the server down. False: in this process."""
    tls_cert: str = ""
    """PEM certificate (chain) the replica presents; with ``tls_key`` it speaks TLS only ("":
    plaintext, for local development)."""
    tls_key: str = ""
    """PEM private key of ``tls_cert`` (unencrypted)."""
    tls_client_ca: str = ""
    """PEM CA file; set, mutual TLS: only clients (routers) presenting a certificate signed by
    this CA get through the handshake."""

    @functools.cached_property
    def tls(self) -> ServerTLS | None:
        """The TLS settings with their files read (once per config); None: plaintext."""
        if not (self.tls_cert or self.tls_key or self.tls_client_ca):
            return None
        return ServerTLS(cert=self.tls_cert, key=self.tls_key, client_ca=self.tls_client_ca)

    def validate(self) -> ReplicaConfig:
        if not _DEVICE.match(self.device):
            raise InvalidArgument(
                f"device: {self.device!r} is not 'cpu' or 'cuda:N'",
                field_violations=[FieldViolation("device", "not cpu or cuda:N")],
            )
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port: {self.port} is out of range")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise InvalidArgument(f"health_port: {self.health_port} is out of range")
        if self.drain_grace_s < 0:
            raise InvalidArgument("drain_grace_s: must not be negative")
        if self.model is not None:
            self.model.validate()
        _ = self.tls  # reads and checks the PEM files; an error names the setting
        return self

    def name(self, bound_port: int) -> str:
        return self.replica_id or f"{socket.gethostname()}:{bound_port}"
