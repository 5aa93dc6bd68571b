"""Routing policies through a real router and three real replicas: affinity keeps a session (or a
shared prompt start) on one replica, spreads different keys, and leaves a replica loaded beyond
the bound; a catalog model's ``routing`` overrides the router's policy."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import grpc
from conftest import StartReplica, StartRouter, collect, demo_spec, scrape, stub
from prometheus_client.parser import text_string_to_metric_families

from meshllm.api.errors import InvalidArgument, from_rpc_error
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.replica.server import ReplicaServer
from meshllm.router import RouterServer
from meshllm.router.placement import CatalogModel
from meshllm.router.route_key import SESSION_HEADER

PICKS = "meshllm_router_affinity_picks_total"


async def picks(router: RouterServer) -> dict[str, float]:
    """The router's affinity picks by outcome (off the event loop: a scrape waits on it)."""
    assert router.metrics_port is not None
    text = await asyncio.to_thread(scrape, router.metrics_port)
    return {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == PICKS and s.labels["model"] == "demo"
    }


SHARED = "You are a careful assistant. " * 12  # 348 characters: past the 256 hashed


def affinity_catalog(**knobs: object) -> tuple[CatalogModel, ...]:
    return (CatalogModel.of(id="demo", path="demo", routing="affinity", **knobs),)


async def served(
    client: gen_grpc.GenerationStub, prompt: str, session: str = "", *, stream: bool = True
) -> str:
    """The replica that served one request (its final chunk's ``timing.replica``)."""
    request = gen.GenerateRequest(model="demo", prompt=prompt, max_tokens=4)
    metadata = ((SESSION_HEADER, session),) if session else ()
    if not stream:
        response: gen.GenerateResponse = await client.Generate(request, metadata=metadata)
        return response.timing.replica
    chunks = await collect(client.GenerateStream(request, metadata=metadata))
    assert chunks[-1].finish_reason != gen.FINISH_REASON_UNSPECIFIED
    return chunks[-1].timing.replica


async def three_demo(start_replica: StartReplica) -> list[ReplicaServer]:
    return [await start_replica(demo_spec()) for _ in range(3)]


async def test_one_session_one_replica_different_sessions_spread(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    # the router's policy is least-busy; the catalog gives demo affinity
    router = await start_router(
        *await three_demo(start_replica), models=affinity_catalog(), metrics_port=0
    )
    channel, client = stub(router.port)
    async with channel:
        homes: dict[str, set[str]] = {}
        for turn in range(4):  # each session's turns: other prompts, unary and streamed
            for s in range(12):
                replica = await served(client, f"turn {turn}", f"conv-{s}", stream=turn % 2 == 0)
                homes.setdefault(f"conv-{s}", set()).add(replica)
        # no session: requests sharing their first 256 characters share a replica too
        by_prefix = {await served(client, f"{SHARED}question {i}") for i in range(6)}
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    spread = Counter(next(iter(r)) for r in homes.values())
    assert len(spread) >= 2, spread  # 12 keys on 3 replicas: all on one would be 3**-11
    assert len(by_prefix) == 1
    assert await picks(router) == {"hit": 48 + 6}


async def test_a_session_key_too_long_is_invalid_argument_naming_it(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    router = await start_router(await start_replica(demo_spec()), policy="affinity")
    channel, client = stub(router.port)
    async with channel:
        try:
            await client.Generate(
                gen.GenerateRequest(model="demo", prompt="x", max_tokens=2),
                metadata=((SESSION_HEADER, "k" * 300),),
            )
        except grpc.aio.AioRpcError as e:
            error = from_rpc_error(e)
        else:
            raise AssertionError("a 300-character session key was accepted")
    assert isinstance(error, InvalidArgument)
    assert [v.field for v in error.field_violations] == [SESSION_HEADER]


async def test_a_replica_loaded_beyond_the_bound_sends_the_session_elsewhere(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    spec = demo_spec(engine="fake", options={"token_delay_ms": "5"})
    replicas = [await start_replica(spec) for _ in range(3)]
    router = await start_router(*replicas, policy="affinity", metrics_port=0)
    by_name = {r.config.replica_id: r for r in replicas}
    channel, client = stub(router.port)
    async with channel:
        home = await served(client, "hello", "conv-1")
        assert await served(client, "hello again", "conv-1") == home
        # another router's traffic on the home replica: six long streams sent to it directly,
        # which the router learns of from the replica's load reports
        direct, direct_client = stub(by_name[home].port)
        flood = [
            direct_client.GenerateStream(
                gen.GenerateRequest(model="demo", prompt="busy", max_tokens=2000)
            )
            for _ in range(6)
        ]
        try:
            mirror = next(r for r in router.registry.replicas.values() if r.name == home)
            await router.registry.changes.wait_for(lambda: mirror.others_requests >= 6, 10.0)
            assert mirror.others_requests >= 6
            away = {await served(client, f"turn {i}", "conv-1") for i in range(3)}
        finally:
            for call in flood:
                call.cancel()
            await direct.close()
        await router.registry.changes.wait_for(lambda: mirror.others_requests == 0, 10.0)
        back = await served(client, "quiet again", "conv-1")
    assert len(away) == 1 and home not in away  # one other replica: the next on the ring
    assert back == home
    assert await picks(router) == {"hit": 3, "fallback": 3}


async def test_the_http_front_routes_on_prompt_cache_key_and_the_session_header(
    start_replica: StartReplica, start_router: StartRouter
) -> None:
    router: RouterServer = await start_router(
        *await three_demo(start_replica), policy="affinity", http_port=0, stale_after_s=10.0
    )
    url = f"http://127.0.0.1:{router.http_port}/v1/chat/completions"

    def counts() -> dict[str, int]:
        return {r.name: r.served_total for r in router.registry.replicas.values()}

    async def sent(
        http: aiohttp.ClientSession, turns: int, headers: dict[str, str] | None = None, **body: str
    ) -> set[str]:
        """The replicas that took ``turns`` requests sent with these headers and body fields."""
        before = counts()
        for i in range(turns):
            fields = {
                "model": "demo",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": f"turn {i}"}],
                **body,
            }
            async with http.post(url, json=fields, headers=headers) as reply:
                assert reply.status == 200, await reply.text()
        return {name for name, n in counts().items() if n > before[name]}

    async with aiohttp.ClientSession() as http:
        by_body = [await sent(http, 4, prompt_cache_key=f"conv-{s}") for s in range(8)]
        by_header = await sent(http, 4, headers={SESSION_HEADER: "conv-0"})
        # the header wins over the body field
        both = await sent(
            http, 4, headers={SESSION_HEADER: "conv-0"}, prompt_cache_key="something else"
        )
        async with http.post(
            url,
            json={"model": "demo", "messages": [{"role": "user", "content": "x"}]},
            headers={SESSION_HEADER: "k" * 300},
        ) as reply:
            refused = (reply.status, (await reply.json())["error"]["param"])
    assert all(len(s) == 1 for s in by_body), by_body
    assert len(set().union(*by_body)) >= 2
    assert by_header == both == by_body[0]
    assert refused == (400, SESSION_HEADER)
