"""One request through a real client, router and replica makes one trace whose spans nest
client -> router -> forward attempt -> replica -> queue and engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import USER, StartRouter, tenants_file
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from meshllm.client import AsyncClient, NotFound, ResourceExhausted
from meshllm.replica.server import ReplicaServer


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process: the global provider cannot be replaced
    yield exporter


def parent_name(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> str | None:
    parent = by_id.get(span.parent.span_id) if span.parent is not None else None
    return parent.name if parent is not None else None


async def test_one_trace_from_the_client_to_the_engine(
    spans: InMemorySpanExporter, demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await start_router(demo_replica)
    spans.clear()
    async with AsyncClient(f"127.0.0.1:{router.port}") as client:
        # greedy: sampling on the random-weight demo model sometimes ends before max_tokens
        chunks = [c async for c in client.stream("hello", model="demo", max_tokens=6, top_k=1)]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    finished = spans.get_finished_spans()
    assert len({s.context.trace_id for s in finished}) == 1, [s.name for s in finished]
    by_id = {s.context.span_id: s for s in finished}
    chain = {s.name: parent_name(s, by_id) for s in finished}
    assert chain == {
        "meshllm.client/GenerateStream": None,
        "meshllm.router/GenerateStream": "meshllm.client/GenerateStream",
        "meshllm.router/forward": "meshllm.router/GenerateStream",
        "meshllm.replica/generate": "meshllm.router/forward",
        "meshllm.replica/queue": "meshllm.replica/generate",
        "meshllm.engine/generate": "meshllm.replica/generate",
    }
    engine = next(s for s in finished if s.name == "meshllm.engine/generate")
    assert engine.attributes is not None and engine.attributes["meshllm.completion_tokens"] == 6
    assert float(engine.attributes["meshllm.time_to_first_token_ms"]) > 0  # type: ignore[arg-type]
    forward = next(s for s in finished if s.name == "meshllm.router/forward")
    assert forward.attributes is not None and forward.attributes["meshllm.replica"] == "r0"


async def test_an_http_request_joins_the_callers_trace(
    spans: InMemorySpanExporter, demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    """The OpenAI-compatible front takes its parent from ``traceparent``, and the request's
    spans nest as a gRPC call's do: one trace from the HTTP caller to the engine."""
    router = await start_router(demo_replica, http_port=0)
    spans.clear()
    trace_id, caller = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with httpx.AsyncClient() as http:
        reply = await http.post(
            f"http://127.0.0.1:{router.http_port}/v1/completions",
            json={"model": "demo", "prompt": "hello", "max_tokens": 3, "stream": True},
            headers={"traceparent": f"00-{trace_id}-{caller}-01"},
        )
    assert reply.status_code == 200 and reply.text.rstrip().endswith("data: [DONE]")
    finished = spans.get_finished_spans()
    assert {f"{s.context.trace_id:032x}" for s in finished} == {trace_id}
    by_id = {s.context.span_id: s for s in finished}
    (served,) = [s for s in finished if s.name == "meshllm.router/GenerateStream"]
    assert served.parent is not None and f"{served.parent.span_id:016x}" == caller
    chain = {s.name: parent_name(s, by_id) for s in finished if s is not served}
    assert chain["meshllm.router/forward"] == "meshllm.router/GenerateStream"
    assert chain["meshllm.replica/generate"] == "meshllm.router/forward"


async def test_quota_admission_is_a_span_of_the_request(
    spans: InMemorySpanExporter,
    demo_replica: ReplicaServer,
    start_router: StartRouter,
    tmp_path: Path,
) -> None:
    router = await start_router(
        demo_replica, auth="api-key", tenants_file=tenants_file(tmp_path, requests_per_minute=1)
    )
    spans.clear()
    async with AsyncClient(f"127.0.0.1:{router.port}", api_key=USER) as client:
        await client.generate("hello", model="demo", max_tokens=2)
        with pytest.raises(ResourceExhausted):
            await client.generate("hello", model="demo", max_tokens=2)
    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    quota = [s for s in finished if s.name == "meshllm.router/quota"]
    assert [parent_name(s, by_id) for s in quota] == ["meshllm.router/Generate"] * 2
    assert [(s.attributes or {}).get("meshllm.quota.outcome") for s in quota] == [
        "admitted",
        "exceeded",
    ]
    assert {(s.attributes or {}).get("meshllm.tenant") for s in quota} == {"batch"}
    assert (quota[0].attributes or {}).get(
        "meshllm.reserved_tokens"
    ) == 2 + 2  # "hello": 2 + max_tokens
    refused = next(
        s for s in finished if s.name == "meshllm.router/Generate" and not s.status.is_ok
    )
    assert (refused.attributes or {}).get("meshllm.tenant") == "batch"


async def test_spans_carry_the_rpc_and_genai_conventions(
    spans: InMemorySpanExporter, demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await start_router(demo_replica)
    spans.clear()
    target = f"127.0.0.1:{router.port}"
    async with AsyncClient(target) as client:
        chunks = [
            c
            async for c in client.stream(
                [{"role": "user", "content": "hello"}],
                model="demo",
                max_tokens=5,
                temperature=0.5,
                top_p=0.9,
                top_k=1,  # greedy: the random-weight demo model never ends before max_tokens
            )
        ]
        with pytest.raises(NotFound):
            await client.generate("hello", model="no-such-model", max_tokens=2)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 5
    finished = spans.get_finished_spans()
    by_name = {s.name: s for s in finished if not s.name.endswith("/Generate")}  # the refused call
    assert len({s.context.trace_id for s in by_name.values()}) == 1
    kinds = {name: s.kind for name, s in by_name.items()}
    assert kinds == {
        "meshllm.client/GenerateStream": SpanKind.CLIENT,
        "meshllm.router/GenerateStream": SpanKind.SERVER,
        "meshllm.router/forward": SpanKind.CLIENT,
        "meshllm.replica/generate": SpanKind.SERVER,
        "meshllm.replica/queue": SpanKind.INTERNAL,
        "meshllm.engine/generate": SpanKind.INTERNAL,
    }
    rpc = {"rpc.system": "grpc", "rpc.service": "meshllm.api.v1.Generation"}
    genai = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "demo",
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.request.top_p": pytest.approx(0.9),  # a float32 on the wire
        "gen_ai.request.top_k": 1,
    }
    answer = {
        "gen_ai.response.finish_reasons": ("length",),
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": 5,
    }
    ok = {"rpc.grpc.status_code": 0, "rpc.method": "GenerateStream"}
    expected = {
        "meshllm.client/GenerateStream": {
            **rpc,
            **ok,
            **genai,
            "server.address": "127.0.0.1",
            "server.port": router.port,
        },
        "meshllm.router/GenerateStream": {**rpc, **ok, **genai, **answer},
        "meshllm.router/forward": {
            **rpc,
            **ok,
            "server.address": "127.0.0.1",
            "server.port": demo_replica.port,
        },
        "meshllm.replica/generate": {**rpc, **ok, **genai, **answer},
    }
    for name, attributes in expected.items():
        got = dict(by_name[name].attributes or {})
        assert {k: got.get(k) for k in attributes} == attributes, name
    assert usage.prompt_tokens > 0
    (refused,) = [s for s in finished if s.name == "meshllm.router/Generate"]
    got = dict(refused.attributes or {})
    assert (got["rpc.method"], got["rpc.grpc.status_code"]) == ("Generate", 5)  # NOT_FOUND
    assert got["gen_ai.operation.name"] == "text_completion"
    assert "gen_ai.response.finish_reasons" not in got and not refused.status.is_ok
