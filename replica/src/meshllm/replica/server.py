"""The replica's gRPC server: Generation, ReplicaControl, health and reflection on grpc.aio."""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from meshllm.api.tls import tls_mode
from meshllm.api.types import ReplicaState
from meshllm.api.v1 import generation_pb2, replica_control_pb2
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.api.v1 import replica_control_pb2_grpc as rc_grpc
from meshllm.replica.config import ReplicaConfig
from meshllm.replica.control import ReplicaControlService
from meshllm.replica.host import Replica
from meshllm.replica.metrics import replica_metrics
from meshllm.replica.service import GenerationService
from meshllm.server.decoding import DecodingServer, add_reflection
from meshllm.server.exposition import serve_metrics
from meshllm.server.serving import listen, serve_until_signal, server_options, start_health_port

log = logging.getLogger(__name__)

GENERATION = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
CONTROL = replica_control_pb2.DESCRIPTOR.services_by_name["ReplicaControl"].full_name
SERVING, NOT_SERVING = (
    health_pb2.HealthCheckResponse.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING,
)


class ReplicaServer:
    """A running replica: ``await start()``, then ``await stop()`` (drains first).

    Health: the overall status ("") and ReplicaControl are SERVING while the process runs, with
    or without a model: an idle replica is a worker waiting for the router to place a model (a
    Kubernetes readiness probe must keep it discoverable). Generation is SERVING only while a
    model is READY.
    """

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config.validate()
        self.port = 0
        self.replica: Replica | None = None
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self.metrics_port: int | None = None
        self._metrics_http: WSGIServer | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self._stopped = False

    async def start(self) -> int:
        server = grpc.aio.server(options=server_options(self.config.max_message_bytes))
        tls = self.config.tls
        self.port = listen(server, self.config.host, self.config.port, tls)
        replica = Replica(self.config, self.config.name(self.port))
        replica.on_state_change.append(self._on_state)
        registry, request_metrics = replica_metrics(replica)
        services = DecodingServer(server)  # undecodable requests: INVALID_ARGUMENT
        gen_grpc.add_GenerationServicer_to_server(
            GenerationService(replica, request_metrics), services
        )
        rc_grpc.add_ReplicaControlServicer_to_server(ReplicaControlService(replica), services)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, services)
        for name, status in (("", SERVING), (CONTROL, SERVING), (GENERATION, NOT_SERVING)):
            await self._health.set(name, status)
        names = (
            GENERATION,
            CONTROL,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        add_reflection(server, names)
        await self._on_state(ReplicaState.EMPTY)
        await server.start()
        self._server, self.replica = server, replica
        if self.config.health_port is not None:
            self._health_server, self.health_port = await start_health_port(
                self.config.host, self.config.health_port, self._health
            )
        if self.config.metrics_port is not None:
            self._metrics_http, self.metrics_port = serve_metrics(
                registry, self.config.host, self.config.metrics_port
            )
        log.info(
            "replica %s listening on %s (device %s, %s)",
            replica.name,
            self.port,
            self.config.device,
            tls_mode(tls, self.health_port),
        )
        if self.config.model is not None:
            await replica.load(self.config.model, wait=False)
        return self.port

    async def _on_state(self, state: ReplicaState) -> None:
        serving = SERVING if state == ReplicaState.READY else NOT_SERVING
        await self._health.set(GENERATION, serving)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new work, let in-flight requests finish within the grace, then exit."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        if self.replica is not None:
            await self.replica.drain(shutdown=True)
            await self.replica.wait_idle(grace)
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self._health_server is not None:
            await self._health_server.stop(grace=None)
        if self.replica is not None:
            await self.replica.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(config: ReplicaConfig) -> None:
    """Run a replica until SIGTERM or SIGINT, then drain and exit."""
    await serve_until_signal(ReplicaServer(config), f"draining (grace {config.drain_grace_s:.0f}s)")
