"""Bad input and abuse against a real replica and a real router (issue 19, items 1-7 and 15):
each reply is a clear status, nothing a caller sends breaks a log line, grows the metrics or
stalls the event loop, and the servers keep serving."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import USER, StartReplica, StartRouter, bearer, collect, demo_spec, stub, tenants_file
from conftest import scrape as scrape_text
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from meshllm.api.bounds import MAX_SHOWN_CHARS, UNKNOWN_MODEL_LABEL
from meshllm.api.errors import from_rpc_error
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.replica.server import ReplicaServer
from meshllm.router import RouterServer
from meshllm.router.server import ADMIN, GENERATION
from meshllm.server import decoding

GENERATE = "/meshllm.api.v1.Generation/Generate"
GENERATE_STREAM = "/meshllm.api.v1.Generation/GenerateStream"
ADMIN_LIST = "/meshllm.api.v1.Admin/ListModels"
CONTROL_STATUS = "/meshllm.api.v1.ReplicaControl/GetStatus"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

# A string field (model, 1) whose bytes are not UTF-8; a length running past the end; noise.
BAD_UTF8 = b"\x0a\x02\xff\xfe"
TRUNCATED = gen.GenerateRequest(model="demo", prompt="hello").SerializeToString()[:-2]
NOISE = bytes(range(256)) * 3


async def raw_call(
    port: int, method: str, payload: bytes, *, stream: bool | str = False
) -> grpc.StatusCode:
    """Send ``payload`` as the request bytes of ``method``; the status it ends with."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        raw: Any = channel
        try:
            if stream == "both":
                async for _ in raw.stream_stream(method)(iter([payload]), timeout=10):
                    pass
            elif stream:
                call = raw.unary_stream(method)(payload, timeout=10)
                async for _ in call:
                    pass
            else:
                await raw.unary_unary(method)(payload, timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(port: int | None) -> Samples:
    """Every sample of a /metrics page as {(name, sorted labels): value}."""
    assert port is not None
    text = await asyncio.to_thread(scrape_text, port)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def healthy(port: int, service: str = "") -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def error_of(
    router_or_replica_port: int, request: gen.GenerateRequest, **kw: object
) -> grpc.aio.AioRpcError:
    channel, client = stub(router_or_replica_port)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.Generate(request, timeout=20, **kw)
    return e.value


async def test_a_seed_beyond_32_bits_is_served_once_and_never_retried(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    replicas = [await start_replica(demo_spec()) for _ in range(2)]
    router = await start_router(*replicas, metrics_port=0)
    channel, client = stub(router.port)
    async with channel:
        for seed in (2**32, 2**64 - 1):
            reply = await client.Generate(
                gen.GenerateRequest(model="demo", prompt="seed", max_tokens=4, seed=seed),
                timeout=20,
            )
            assert reply.usage.completion_tokens >= 1
    samples = await scrape(router.metrics_port)
    assert not [k for k in samples if k[0] == "meshllm_router_retries_total" and samples[k]]
    served = sum(r.replica.requests_total for r in replicas if r.replica is not None)
    assert served == 2  # one attempt each


async def test_undecodable_bytes_are_invalid_argument_on_every_service_with_no_traceback(
    start_replica: StartReplica, start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    replica = await start_replica(demo_spec(), health_port=0)
    router = await start_router(replica)
    decoding._refusals = decoding._RefusalLog()  # a fresh rate limit: this test counts lines
    targets: list[tuple[int, str, bool | str]] = [
        (replica.port, GENERATE, False),
        (replica.port, GENERATE_STREAM, True),
        (replica.port, CONTROL_STATUS, False),
        (replica.port, HEALTH_CHECK, False),
        (router.port, GENERATE, False),
        (router.port, GENERATE_STREAM, True),
        (router.port, ADMIN_LIST, False),
        (router.port, HEALTH_CHECK, False),
        (replica.port, REFLECTION, "both"),
        (router.port, REFLECTION, "both"),
    ]
    assert replica.health_port is not None
    targets.append((replica.health_port, HEALTH_CHECK, False))
    with caplog.at_level(logging.DEBUG):
        for port, method, streams in targets:
            for payload in (BAD_UTF8, TRUNCATED, NOISE):
                code = await raw_call(port, method, payload, stream=streams)
                # An empty request message reads field 1 as an unknown field: valid protobuf.
                fine = {grpc.StatusCode.INVALID_ARGUMENT}
                if payload is BAD_UTF8 and method in (CONTROL_STATUS, ADMIN_LIST):
                    fine.add(grpc.StatusCode.OK)
                assert code in fine, (port, method, payload[:8], code)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    refusals = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(refusals) == 1  # one short line for the 33 refusals
    assert await healthy(replica.port) and await healthy(router.port)


async def test_long_strings_are_refused_before_tokenizing_and_health_keeps_answering(
    demo_replica: ReplicaServer,
) -> None:
    port = demo_replica.port
    role = gen.GenerateRequest(
        model="demo", messages=[gen.ChatMessage(role="r" * 3_500_000, content="hi")]
    )
    content = gen.GenerateRequest(
        model="demo", messages=[gen.ChatMessage(role="user", content="x" * 900_000)]
    )
    for request, field, says in (
        (role, "messages[0].role", "1 to 64 characters"),
        (content, "prompt", "at least"),  # refused on its length, not tokenized
        (gen.GenerateRequest(model="demo", prompt="x", stop=["s" * 300]), "stop[0]", "1 to 256"),
    ):
        health = asyncio.ensure_future(healthy(port))
        error = from_rpc_error(await error_of(port, request))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        violations = {v.field: v.description for v in error.field_violations}
        assert says in violations[field], violations
        assert await health  # within its 5 s deadline: on main the loop was blocked 4-22 s


async def test_request_id_is_validated_before_it_reaches_a_log_line(
    demo_replica: ReplicaServer, start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    router = await start_router(demo_replica)
    forged = "x\n2026-01-01 INFO meshllm.requests: request request_id=y code=OK tenant=admin"
    with caplog.at_level(logging.INFO, logger="meshllm.requests"):
        for port in (demo_replica.port, router.port):
            for request_id in (forged, "a" * 129, "quote'd", "white space", "é"):
                request = gen.GenerateRequest(model="demo", prompt="x", request_id=request_id)
                error = from_rpc_error(await error_of(port, request))
                assert error.code == grpc.StatusCode.INVALID_ARGUMENT
                assert [v.field for v in error.field_violations] == ["request_id"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("\n" not in line and "FORGED" not in line for line in lines)
    assert not [line for line in lines if "code=OK" in line]
    channel, client = stub(router.port)
    async with channel:
        ok = await client.Generate(
            gen.GenerateRequest(model="demo", prompt="x", max_tokens=2, request_id="job-7:item/3")
        )
    assert ok.request_id == "job-7:item/3"


async def test_error_messages_quote_at_most_a_bounded_piece_of_the_input(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await start_router(demo_replica)
    for port in (demo_replica.port, router.port):
        huge = await error_of(port, gen.GenerateRequest(model="m" * 100_000, prompt="x"))
        assert huge.code() == grpc.StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED
        assert len(huge.details() or "") < 300
        unknown = await error_of(port, gen.GenerateRequest(model="n" * 250, prompt="x"))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        assert "n" * MAX_SHOWN_CHARS in (unknown.details() or "")
        assert "n" * (MAX_SHOWN_CHARS + 1) not in (unknown.details() or "")
        assert "250 characters" in (unknown.details() or "")


async def test_unknown_model_names_are_counted_under_one_label(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    replica = await start_replica(demo_spec(), metrics_port=0)
    router = await start_router(replica, metrics_port=0)
    for port in (replica.port, router.port):
        for i in range(20):
            await error_of(port, gen.GenerateRequest(model=f"invented-{i}", prompt="x"))
    for server in (replica, router):
        samples = await scrape(server.metrics_port)
        labels = {dict(k[1]).get("model") for k in samples if "model" in dict(k[1])}
        assert not [m for m in labels if m and m.startswith("invented")], labels
        part = "router" if isinstance(server, RouterServer) else "replica"
        name = f"meshllm_{part}_requests_total"
        assert value(samples, name, model=UNKNOWN_MODEL_LABEL, code="NOT_FOUND") == 20


async def test_instructions_with_token_ids_is_invalid_argument(demo_replica: ReplicaServer) -> None:
    request = gen.GenerateRequest(model="demo", token_ids=[5, 6], instructions="be brief")
    error = from_rpc_error(await error_of(demo_replica.port, request))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations] == ["instructions"]


async def test_a_tenant_may_not_raise_priority_above_its_ceiling(
    start_replica: StartReplica, start_router: StartRouter, tmp_path: Path
) -> None:
    router = await start_router(
        await start_replica(demo_spec()),
        auth="api-key",
        tenants_file=tenants_file(tmp_path, max_priority=3),
    )
    channel, client = stub(router.port)
    async with channel:
        for priority in (-5, 0, 3):
            reply = await client.Generate(
                gen.GenerateRequest(model="demo", prompt="x", max_tokens=2, priority=priority),
                metadata=bearer(USER),
            )
            assert reply.usage.completion_tokens >= 1
    request = gen.GenerateRequest(model="demo", prompt="x", max_tokens=2, priority=4)
    error = from_rpc_error(await error_of(router.port, request, metadata=bearer(USER)))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.field_violations] == ["priority"]
    assert "ceiling of 3" in error.message


async def test_the_first_chunk_names_the_model_and_router_health_knows_admin(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await start_router(demo_replica)
    for port in (demo_replica.port, router.port):
        channel, client = stub(port)
        async with channel:
            chunks = await collect(
                client.GenerateStream(gen.GenerateRequest(model="demo", prompt="x", max_tokens=6))
            )
        assert len(chunks) >= 2
        assert chunks[0].model == "demo" and chunks[-1].model == "demo"
        assert all(c.model == "" for c in chunks[1:-1])
    assert await healthy(router.port, ADMIN)
    assert await healthy(router.port, GENERATION)


async def test_admin_calls_bound_and_truncate_what_they_echo(
    demo_replica: ReplicaServer, start_router: StartRouter
) -> None:
    router = await start_router(demo_replica)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
        admin = adm_grpc.AdminStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin.ScaleModel(adm.ScaleModelRequest(model="m" * 100_000, replicas=1))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(e.value.details() or "") < 300
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin.GetQuotaUsage(adm.GetQuotaUsageRequest(tenant="t" * 100_000))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "100000 characters" in (e.value.details() or "")
        assert len(e.value.details() or "") < 300
