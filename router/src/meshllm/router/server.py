"""The router's gRPC server: Generation, health and reflection on grpc.aio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from meshllm.api.tls import tls_mode
from meshllm.api.v1 import admin_pb2, generation_pb2
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.router.admin import RouterAdminService
from meshllm.router.admission import Admission, QuotaMetrics
from meshllm.router.auth import Authenticator, TenantsFile
from meshllm.router.balancer import Routing, make_policy
from meshllm.router.config import RouterConfig
from meshllm.router.discovery import Discovery
from meshllm.router.fairqueue import AdmissionQueue, QueueMetrics
from meshllm.router.fairqueue.shared import SharedCounters
from meshllm.router.forward import Forwarder
from meshllm.router.http import HttpFront
from meshllm.router.metrics import router_metrics
from meshllm.router.outliers import OutlierDetector
from meshllm.router.picking import Picker
from meshllm.router.placement.control import Placement
from meshllm.router.placement.desired import RedisCounts
from meshllm.router.pool import LinkSettings, ReplicaPool
from meshllm.router.quota import make_store
from meshllm.router.quota.redis_store import RedisQuotaStore
from meshllm.router.registry import Registry
from meshllm.router.service import RouterGenerationService
from meshllm.server.decoding import DecodingServer, add_reflection
from meshllm.server.exposition import serve_metrics
from meshllm.server.serving import listen, serve_until_signal, server_options, start_health_port

log = logging.getLogger(__name__)

ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
GENERATION = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING, NOT_SERVING = (
    health_pb2.HealthCheckResponse.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING,
)


class RouterServer:
    """A running router: ``await start()``, then ``await stop()`` (lets in-flight streams end).

    Health: the overall status ("") and the Admin service are SERVING while the router runs;
    the Generation service is SERVING while at least one replica can take work.
    """

    def __init__(self, config: RouterConfig) -> None:
        self.config = c = config.validate()
        self.port = 0
        outliers = OutlierDetector(c.outliers) if c.outliers.enabled else None
        self.registry = Registry(stale_after_s=c.discovery.stale_after_s, outliers=outliers)
        links = LinkSettings(
            discovery=c.discovery,
            tls=c.replica_tls.loaded,
            max_message_bytes=c.max_message_bytes,
            drain_grace_s=c.drain_grace_s,
        )
        self.pool = ReplicaPool(links, self.registry, self._on_change)
        self._discovery = Discovery(c.discovery)
        self._tenants = TenantsFile(Path(c.tenants_file)) if c.auth == "api-key" else None
        self._store = make_store(
            c.quota.store,
            redis_url=c.redis.address(),
            concurrency_retry_s=c.retry_after_s,
            lease_s=c.quota.lease_s,
            timeout_s=c.redis.timeout_s,
        )
        self.placement = Placement(c.placement, c.models, self.registry, self.pool, self._counts())
        self._health = HealthServicer()
        self._stopped = False
        self.metrics_port: int | None = None
        self._metrics_http: WSGIServer | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self.admission: Admission | None = None
        self.shared_counters: SharedCounters | None = None
        self.http_port: int | None = None
        self._http: HttpFront | None = None

    def _counts(self) -> RedisCounts | None:
        """Desired replica counts in Redis when placement shares them (else this router's)."""
        if not self.config.placement.share_counts:
            return None
        if isinstance(self._store, RedisQuotaStore):
            return RedisCounts(self._store.redis)  # one connection pool per router
        return RedisCounts.connect(self.config.redis.address(), self.config.redis.timeout_s)

    async def start(self) -> int:
        server = grpc.aio.server(options=server_options(self.config.max_message_bytes))
        tls = self.config.tls.loaded
        self.port = listen(server, self.config.host, self.config.port, tls)
        prometheus = self._add_services(server)
        await self._health.set("", SERVING)
        await self._health.set(ADMIN, SERVING)  # Admin answers whenever the router runs
        await self._health.set(GENERATION, NOT_SERVING)
        self.pool.sync(await self._discovery.addresses())
        self.placement.start()
        if self.shared_counters is not None:
            self.shared_counters.start()
        if self._discovery.dynamic or self._tenants is not None:
            self._refresher = asyncio.create_task(self._refresh(), name="refresh")
        await server.start()
        self._server = server
        if self.config.health_port is not None:
            self._health_server, self.health_port = await start_health_port(
                self.config.host, self.config.health_port, self._health
            )
        if self.config.metrics_port is not None:
            self._metrics_http, self.metrics_port = serve_metrics(
                prometheus, self.config.host, self.config.metrics_port
            )
        if self._http is not None:
            self.http_port = await self._http.start()
            log.info("OpenAI-compatible HTTP API on %s:%d", self.config.host, self.http_port)
        log.info(
            "router listening on %s (%s, %d replica addresses, %s; to replicas: %s)",
            self.port,
            self.config.policy,
            len(self.pool.links),
            tls_mode(tls, self.health_port),
            "TLS" if self.config.replica_tls.loaded else "plaintext",
        )
        self._log_access()
        return self.port

    def _add_services(self, server: grpc.aio.Server) -> CollectorRegistry:
        """Generation, Admin, health and reflection on ``server``; returns the metrics registry."""
        c = self.config
        prometheus, metrics = router_metrics(self.registry, c.tokens_per_request)
        self.auth = Authenticator(self._tenants.tenants if self._tenants else None, prometheus)
        self.admission = Admission(
            self._store, c.quota.unavailable, c.retry_after_s, QuotaMetrics(prometheus)
        )
        catalog = frozenset(m.id for m in c.models)
        routing = Routing(tokens_per_request=c.tokens_per_request, counted=metrics.affinity_pick)
        picker = Picker(
            self.registry,
            self.pool,
            make_policy(c.policy, routing),
            catalog=catalog,
            retry_after_s=c.retry_after_s,
            policies={  # a catalog model's own policy and knobs
                m.id: make_policy(m.routing or c.policy, replace(routing, affinity=m.affinity))
                for m in c.models
            },
            replica_queue=c.queue.replica_queue if c.queue.enabled else None,
        )
        self.queue = AdmissionQueue(
            self.registry, c.queue, QueueMetrics(prometheus), retry_after_s=c.retry_after_s
        )
        if isinstance(self._store, RedisQuotaStore) and c.queue.enabled:
            self.shared_counters = SharedCounters(
                self._store.redis, self.queue, c.queue.share_interval_s
            )
        forwarder = Forwarder(
            self.registry,
            picker,
            metrics=metrics,
            admission=self.admission,
            queue=self.queue,
            max_attempts=c.max_attempts,
            retry_after_s=c.retry_after_s,
        )
        services = DecodingServer(server)  # undecodable requests: INVALID_ARGUMENT
        if c.http.port is not None:  # the same forwarder: one path for both fronts
            self._http = HttpFront(
                forwarder=forwarder,
                registry=self.registry,
                auth=self.auth,
                config=c.http,
                host=c.host,
                grace_s=c.drain_grace_s,
                tls=c.tls.loaded,
            )
        gen_grpc.add_GenerationServicer_to_server(
            RouterGenerationService(forwarder, self.registry, self.auth), services
        )
        adm_grpc.add_AdminServicer_to_server(
            RouterAdminService(self.auth, self.placement, self._store), services
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, services)
        add_reflection(server, (GENERATION, ADMIN, HEALTH, reflection.SERVICE_NAME))
        return prometheus

    def _log_access(self) -> None:
        if self._tenants is None:
            log.warning(
                "AUTHENTICATION DISABLED (auth = 'none'): every caller is an admin with no "
                "quota; use this for local development only"
            )
        else:
            log.info(
                "%d tenants from %s; quota store: %s",
                len(self._tenants.tenants),
                self._tenants.path,
                getattr(self._store, "url", self.config.quota.store),
            )

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.config.discovery.refresh_s)
            if self._discovery.dynamic:
                self.pool.sync(await self._discovery.addresses())
            if self._tenants is not None and (tenants := self._tenants.reload()) is not None:
                self.auth.use(tenants)

    def _on_change(self) -> None:
        self.placement.changed()
        status = SERVING if self.registry.ready_models() else NOT_SERVING
        task = asyncio.get_running_loop().create_task(self._health.set(GENERATION, status))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within the grace, then close everything."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        stopping = [self._server.stop(grace=grace)] if self._server is not None else []
        if self._http is not None:
            stopping.append(self._http.stop())
        await asyncio.gather(*stopping)
        if self._health_server is not None:
            await self._health_server.stop(grace=None)
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.placement.close()
        if self.shared_counters is not None:
            await self.shared_counters.close()
        await self.pool.close()
        if self.admission is not None:
            await self.admission.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(config: RouterConfig) -> None:
    """Run a router until SIGTERM or SIGINT, then let in-flight streams finish and exit."""
    await serve_until_signal(
        RouterServer(config), f"finishing in-flight streams (grace {config.drain_grace_s:.0f}s)"
    )
