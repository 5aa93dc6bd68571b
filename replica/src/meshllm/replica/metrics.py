"""The replica's Prometheus metrics: per-request counters and histograms, and load gauges read
at scrape time. The load gauges use vLLM's names, which the Kubernetes Gateway API Inference
Extension's model-server protocol recommends (``vllm:kv_cache_usage_perc``, vLLM's current name
for the cache gauge), so its endpoint picker can scrape our replicas as they are. Their model
label is ``model``, as on every other meshllm metric: the endpoint picker reads them by name."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshllm.api.types import ReplicaState
from meshllm.replica.host import Replica
from meshllm.server.metrics import RequestMetrics, on_loop, server_registry

REPORTED_STATES = tuple(s for s in ReplicaState if s is not ReplicaState.UNKNOWN)
"""The states a replica can be in: ``UNKNOWN`` is the router's word for one not heard from."""


class LoadCollector(Collector):
    def __init__(self, replica: Replica) -> None:
        self._replica, self._loop = replica, asyncio.get_running_loop()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        report = on_loop(self._loop, self._replica.load_report)
        model = report.model
        for name, help_text, value in (
            ("vllm:num_requests_waiting", "Requests admitted and waiting for the engine.", report.queued),
            ("vllm:num_requests_running", "Requests generating now.", report.running),
            ("vllm:kv_cache_usage_perc", "KV-cache use, 0..1 (0 where the engine does not report it).",
             report.cache_utilization),
            ("meshllm_replica_tokens_in_flight", "Tokens still to generate for admitted requests, at most.",
             report.tokens_in_flight),
        ):  # fmt: skip
            family = GaugeMetricFamily(name, help_text, labels=["model"])
            family.add_metric([model], float(value))
            yield family
        state = GaugeMetricFamily(
            "meshllm_replica_state", "1 for the replica's current state.", labels=["state"]
        )
        for s in REPORTED_STATES:
            state.add_metric([s.value], 1.0 if s == report.state else 0.0)
        yield state


def replica_metrics(replica: Replica) -> tuple[CollectorRegistry, RequestMetrics]:
    registry = server_registry()
    registry.register(LoadCollector(replica))
    return registry, RequestMetrics(registry, "meshllm_replica")
