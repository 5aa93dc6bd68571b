"""Prometheus /metrics and access logs on a real router and replica: counters and histograms
move by what the traffic did; one log line per request, without the prompt."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request

import grpc
import pytest
from conftest import StartReplica, StartRouter, collect, demo_spec, stub
from prometheus_client.parser import text_string_to_metric_families

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.replica.server import ReplicaServer
from meshllm.server.logs import JsonFormatter

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int | None) -> Samples:
    """Every sample as {(name, sorted labels): value} (off the event loop: a scrape waits on it)."""
    assert port is not None

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return str(r.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_router_and_replica_metrics_count_the_traffic(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    replica = await start_replica(demo_spec(), metrics_port=0)
    router = await start_router(replica, metrics_port=0)
    before = {
        "router": await scrape(router.metrics_port),
        "replica": await scrape(replica.metrics_port),
    }
    channel, client = stub(router.port)
    async with channel:
        streams = await asyncio.gather(
            *(
                collect(
                    client.GenerateStream(
                        gen.GenerateRequest(model="demo", prompt=f"hi {i}", max_tokens=12)
                    )
                )
                for i in range(5)
            )
        )
        unary = await client.Generate(gen.GenerateRequest(model="demo", prompt="x", max_tokens=7))
        with pytest.raises(grpc.aio.AioRpcError):
            await client.Generate(gen.GenerateRequest(model="demo", prompt="x", temperature=-1))
    completion = sum(s[-1].usage.completion_tokens for s in streams) + unary.usage.completion_tokens
    prompt = sum(s[-1].usage.prompt_tokens for s in streams) + unary.usage.prompt_tokens
    for part in ("router", "replica"):
        port = router.metrics_port if part == "router" else replica.metrics_port
        after, old, p = await scrape(port), before[part], f"meshllm_{part}"

        def moved(name: str, old: Samples = old, after: Samples = after, **labels: str) -> float:
            return value(after, name, **labels) - value(old, name, **labels)

        assert moved(f"{p}_requests_total", model="demo", code="OK") == 6, part
        assert moved(f"{p}_requests_total", model="demo", code="INVALID_ARGUMENT") == 1, part
        assert moved(f"{p}_generated_tokens_total", model="demo") == completion, part
        assert moved(f"{p}_prompt_tokens_total", model="demo") == prompt, part
        assert moved(f"{p}_request_duration_seconds_count", model="demo") == 7, part
        ttft = moved(f"{p}_time_to_first_token_seconds_count", model="demo")
        assert ttft == (5 if part == "router" else 6), (
            part
        )  # the router sees no token of a unary reply
    replica_now = await scrape(replica.metrics_port)
    assert value(replica_now, "vllm:num_requests_waiting", model="demo") == 0
    assert value(replica_now, "vllm:num_requests_running", model="demo") == 0
    assert value(replica_now, "meshllm_replica_state", state="ready") == 1
    router_now = await scrape(router.metrics_port)
    address = f"127.0.0.1:{replica.port}"
    assert (
        value(
            router_now,
            "meshllm_router_replica_available",
            replica="r0",
            address=address,
            model="demo",
        )
        == 1
    )


async def test_each_request_logs_one_access_line_without_the_prompt(
    demo_replica: ReplicaServer, start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    router = await start_router(demo_replica)
    channel, client = stub(router.port)
    with caplog.at_level(logging.INFO, logger="meshllm.requests"):
        async with channel:
            await client.Generate(
                gen.GenerateRequest(
                    model="demo", prompt="secret prompt", max_tokens=5, request_id="req-7"
                )
            )
    lines = [r for r in caplog.records if r.name == "meshllm.requests"]
    assert len(lines) == 2  # the router's and the replica's
    for line in lines:
        fields = line.__dict__
        assert (fields["request_id"], fields["model"], fields["code"]) == ("req-7", "demo", "OK")
        assert (fields["replica"], fields["completion_tokens"]) == ("r0", 5)
        assert "secret" not in line.getMessage()
    record = next(r for r in lines)
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["request_id"] == "req-7" and parsed["duration_ms"] > 0
