"""The router's Prometheus metrics: per-request counters and histograms (as the replica's, with
the ``meshllm_router`` prefix), retries, outlier ejections, and each replica's load as this
router sees it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshllm.api.bounds import UNKNOWN_MODEL_LABEL
from meshllm.router.affinity import Outcome
from meshllm.router.balancer import load
from meshllm.router.registry import Registry
from meshllm.router.route_key import RouteKey
from meshllm.server.metrics import RequestMetrics, on_loop, server_registry


class ReplicaLoadCollector(Collector):
    """Read at scrape time from the registry: nothing to keep in step."""

    def __init__(self, registry: Registry, tokens_per_request: int) -> None:
        self._registry, self._tokens_per_request = registry, tokens_per_request
        self._loop = asyncio.get_running_loop()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return iter(on_loop(self._loop, self._families))

    def _families(self) -> list[GaugeMetricFamily]:
        labels = ["replica", "address", "model"]
        families = {
            "inflight": GaugeMetricFamily(
                "meshllm_router_replica_inflight_requests",
                "Requests this router has in flight on the replica.",
                labels=labels,
            ),
            "load": GaugeMetricFamily(
                "meshllm_router_replica_load",
                "The least-busy load score of the replica.",
                labels=labels,
            ),
            "available": GaugeMetricFamily(
                "meshllm_router_replica_available",
                "1 while the replica takes new work.",
                labels=labels,
            ),
        }
        now, stale = self._registry.clock(), self._registry.stale_after_s
        ejected: dict[str, int] = {}
        for r in self._registry.replicas.values():
            model = r.report.model if r.report is not None else ""
            values = [r.name, r.address, model]
            families["inflight"].add_metric(values, r.inflight)
            families["load"].add_metric(values, load(r, self._tokens_per_request))
            families["available"].add_metric(values, 1.0 if r.serves(model, now, stale) else 0.0)
            if model:  # a model some replica reports: never a name a client sent
                ejected[model] = ejected.get(model, 0) + r.outlier.ejected(now)
        outliers = GaugeMetricFamily(
            "meshllm_router_replicas_ejected",
            "Replicas of the model ejected as outliers now (their load reports do not re-admit "
            "them).",
            labels=["model"],
        )
        for model, count in sorted(ejected.items()):
            outliers.add_metric([model], count)
        return [*families.values(), outliers]


class RouterMetrics(RequestMetrics):
    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "meshllm_router")
        self.retries = Counter(
            "meshllm_router_retries",
            "Attempts retried on another replica, by the failed attempt's code.",
            ["model", "code"],
            registry=registry,
        )
        self.outlier_ejections = Counter(
            "meshllm_router_outlier_ejections",
            "Outlier ejections of the replica (it failed too many attempts).",
            ["replica"],  # the configured replicas' names, never a client's
            registry=registry,
        )
        self.affinity_picks = Counter(
            "meshllm_router_affinity_picks",
            "Picks of the affinity policy (each attempt), by outcome: hit (the key's own "
            "replica), fallback (it was beyond the load bound), no_key.",
            ["model", "outcome"],
            registry=registry,
        )

    def affinity_pick(self, key: RouteKey, outcome: Outcome) -> None:
        self.affinity_picks.labels(key.label or UNKNOWN_MODEL_LABEL, outcome.value).inc()


def router_metrics(
    registry: Registry, tokens_per_request: int
) -> tuple[CollectorRegistry, RouterMetrics]:
    prometheus = server_registry()
    prometheus.register(ReplicaLoadCollector(registry, tokens_per_request))
    return prometheus, RouterMetrics(prometheus)
