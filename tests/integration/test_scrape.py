"""The ``/metrics`` endpoints as real scrapers see them: both exposition formats keep the Gateway
API Inference Extension's ``vllm:`` gauge names, promtool's lint finds nothing else to fault,
the endpoint answers only ``/metrics``, and a real Prometheus stores the gauges under their
names."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import StartReplica, StartRouter, collect, demo_spec, stub
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families
from prometheus_client.samples import Sample

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.client.local import free_port

GIE_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
TEXT = "text/plain;version=0.0.4"
# What Prometheus 2.x sends (3.x offers OpenMetrics first too): prometheus-client's own endpoint
# answers it with OpenMetrics whose sample names have ':' replaced by '_'.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def get(port: int | None, path: str = "/metrics", accept: str = TEXT) -> tuple[int, str, str]:
    """(status, content type, body) of one HTTP GET."""
    assert port is not None
    try:
        with urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept}),
            timeout=10,
        ) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


async def samples(port: int | None, accept: str) -> list[Sample]:
    status, content_type, body = await asyncio.to_thread(get, port, "/metrics", accept)
    assert status == 200
    parse = openmetrics_families if "openmetrics" in content_type else text_families
    return [s for family in parse(body) for s in family.samples]


@pytest.mark.parametrize("accept", [TEXT, PROMETHEUS_ACCEPT])
async def test_a_scrape_in_either_format_keeps_every_name(
    accept: str, start_replica: StartReplica, start_router: StartRouter
) -> None:
    replica = await start_replica(demo_spec(), metrics_port=0)
    router = await start_router(replica, metrics_port=0)
    channel, client = stub(router.port)
    async with channel:
        chunks = await collect(
            client.GenerateStream(gen.GenerateRequest(model="demo", prompt="hi", max_tokens=9))
        )
    last = chunks[-1]
    # the engine's decode time over the tokens after the first, on both servers
    tpot = last.timing.decode_ms / 1e3 / (last.usage.completion_tokens - 1)
    status, content_type, _ = await asyncio.to_thread(get, replica.metrics_port, "/metrics", accept)
    assert status == 200
    assert content_type.startswith(
        "application/openmetrics-text; version=1.0.0"
        if accept != TEXT
        else "text/plain; version=0.0.4"
    )
    for part, port in (("replica", replica.metrics_port), ("router", router.metrics_port)):
        scraped = await samples(port, accept)
        names = {s.name for s in scraped}
        if part == "replica":
            for gauge in GIE_GAUGES:
                assert [s.labels for s in scraped if s.name == gauge] == [{"model": "demo"}], gauge
            assert not {n for n in names if n.startswith("vllm_")}
        # the process's own metrics, and one streamed reply's time per output token
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names, part
        assert "python_info" in names, part
        count, total = (
            [s for s in scraped if s.name == f"meshllm_{part}_time_per_output_token_seconds_{x}"]
            for x in ("count", "sum")
        )
        assert [(s.labels, s.value) for s in count] == [({"model": "demo"}, 1.0)], part
        assert total[0].value == pytest.approx(tpot), part
        # one label name for the model on every metric
        assert not [s for s in scraped if "model_name" in s.labels], part


async def test_the_metrics_server_answers_only_metrics(start_replica: StartReplica) -> None:
    replica = await start_replica(demo_spec(), metrics_port=0)
    for path in ("/", "/favicon.ico", "/metrics/x", "/metricsx", "/debug"):
        status, _, body = await asyncio.to_thread(get, replica.metrics_port, path)
        assert (status, "vllm:" in body) == (404, False), path
    status, _, body = await asyncio.to_thread(get, replica.metrics_port, "/metrics?x=1")
    assert status == 200 and "vllm:num_requests_waiting{" in body

    def raw(method: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        port = replica.metrics_port
        try:
            with urllib.request.urlopen(
                urllib.request.Request(
                    f"http://127.0.0.1:{port}/metrics", method=method, headers=headers
                ),
                timeout=10,
            ) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    status, headers, zipped = await asyncio.to_thread(raw, "GET", {"Accept-Encoding": "gzip"})
    assert (status, headers["Content-Encoding"]) == (200, "gzip")
    assert b"vllm:num_requests_waiting{" in gzip.decompress(zipped)
    status, headers, _ = await asyncio.to_thread(raw, "POST", {})
    assert (status, headers["Allow"]) == (405, "GET, HEAD")


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian's prometheus package; make setup)"
)


def promtool_problems(text: str) -> list[str]:
    """What ``promtool check metrics`` says about a scrape (nothing when it passes)."""
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        check=False,
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    problems = (done.stdout + done.stderr).strip().splitlines()
    assert (done.returncode == 0) == (not problems), (done.returncode, problems)
    return problems


@needs_promtool
async def test_promtool_check_metrics(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    replica = await start_replica(demo_spec(), metrics_port=0)
    router = await start_router(replica, metrics_port=0)
    channel, client = stub(router.port)
    async with channel:
        await collect(
            client.GenerateStream(gen.GenerateRequest(model="demo", prompt="hi", max_tokens=4))
        )
    _, _, router_text = await asyncio.to_thread(get, router.metrics_port)
    _, _, replica_text = await asyncio.to_thread(get, replica.metrics_port)
    assert await asyncio.to_thread(promtool_problems, router_text) == []
    # promtool's lint reserves ':' for recording rules; the inference extension needs vLLM's
    # names, so those three are the only lint findings a replica may have
    problems = await asyncio.to_thread(promtool_problems, replica_text)
    assert sorted(problems) == sorted(
        f"{g} metric names should not contain ':'" for g in GIE_GAUGES
    )


PROMETHEUS = shutil.which("prometheus")


def prometheus_query(port: int, query: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    result: list[dict[str, object]] = answer["data"]["result"]
    return result


@pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian's package; make setup)"
)
async def test_a_real_prometheus_stores_the_gauges_under_their_names(
    start_replica: StartReplica, tmp_path: Path
) -> None:
    assert PROMETHEUS is not None
    replica = await start_replica(demo_spec(), metrics_port=0)
    config, port = tmp_path / "prometheus.yml", free_port()
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: replica\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{replica.metrics_port}']}}]\n"
    )
    proc = await asyncio.create_subprocess_exec(
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        found: list[dict[str, object]] = []
        deadline = time.monotonic() + 60
        while not found and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            assert proc.returncode is None, f"prometheus exited with {proc.returncode}"
            try:
                found = await asyncio.to_thread(prometheus_query, port, "vllm:num_requests_waiting")
            except OSError:
                continue  # not listening yet
        assert found, "Prometheus stored no vllm:num_requests_waiting within 60 s"
        assert found[0]["metric"] == {
            "__name__": "vllm:num_requests_waiting",
            "instance": f"127.0.0.1:{replica.metrics_port}",
            "job": "replica",
            "model": "demo",
        }
        for gauge in GIE_GAUGES:
            assert await asyncio.to_thread(prometheus_query, port, gauge), gauge
        escaped = '{__name__=~"vllm_.*"}'
        assert await asyncio.to_thread(prometheus_query, port, escaped) == []
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
