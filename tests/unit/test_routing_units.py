"""Unit tests of the routing policies beside least-busy: power-of-two choices, the hash ring,
affinity's bounded load, the route key a request gives, and their settings in the catalog."""

from __future__ import annotations

import random
from collections import Counter

import grpc
import pytest

from meshllm.api.errors import InvalidArgument
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router import balancer, config
from meshllm.router.affinity import Affinity, AffinitySettings, Outcome
from meshllm.router.balancer import LeastBusy, PowerOfTwo, Routing, load, make_policy
from meshllm.router.http import requests
from meshllm.router.placement import parse_catalog
from meshllm.router.registry import Replica
from meshllm.router.request import route_key
from meshllm.router.ring import HashRing
from meshllm.router.route_key import (
    MAX_PREFIX_CHARS,
    MAX_SESSION_CHARS,
    SESSION_HEADER,
    RouteKey,
    prompt_prefix,
)

TPR = 256


def replicas(*inflight: int) -> list[Replica]:
    out = []
    for i, n in enumerate(inflight):
        r = Replica(address=f"10.0.0.{i}:50061", replica_id=f"r{i}")
        r.inflight = n
        out.append(r)
    return out


def affinity(seen: list[Outcome] | None = None, **settings: float) -> Affinity:
    return Affinity(
        AffinitySettings(**settings),  # type: ignore[arg-type]
        load=lambda r: load(r, TPR),
        fallback=LeastBusy(TPR, rng=random.Random(1)),
        counted=lambda key, outcome: seen.append(outcome) if seen is not None else None,
    )


def session(name: str, tenant: str = "t") -> RouteKey:
    return RouteKey(model="m", label="m", tenant=tenant, session=name)


# --- power of two choices -------------------------------------------------------------------


def test_power_of_two_takes_the_less_loaded_of_two_random_candidates() -> None:
    candidates = replicas(5, 1, 3, 0, 2)
    policy, twin = PowerOfTwo(TPR, rng=random.Random(11)), random.Random(11)
    for _ in range(200):
        a, b = twin.sample(candidates, 2)  # the same draws the policy makes
        expected = a if a.inflight < b.inflight else b
        assert policy.pick(candidates) is expected
    # a replica wins the pairs with the busier ones: r3 4 of the 10 pairs, r1 3, r4 2, r2 1,
    # r0 (the busiest) none
    again = PowerOfTwo(TPR, rng=random.Random(3))
    picks = Counter(again.pick(candidates).name for _ in range(2000))
    assert "r0" not in picks and picks["r3"] > picks["r1"] > picks["r4"] > picks["r2"]


def test_power_of_two_breaks_ties_at_random_and_takes_a_lone_candidate() -> None:
    (only,) = replicas(9)
    assert PowerOfTwo(TPR).pick([only]) is only
    pair = replicas(1, 1)
    policy = PowerOfTwo(TPR, rng=random.Random(5))
    counts = Counter(policy.pick(pair).name for _ in range(400))
    assert set(counts) == {"r0", "r1"} and min(counts.values()) > 150


def test_every_policy_name_builds_and_the_config_accepts_exactly_those() -> None:
    assert tuple(balancer.POLICIES) == config.POLICIES
    assert isinstance(make_policy("power-of-two", Routing()), PowerOfTwo)
    assert isinstance(make_policy("affinity", Routing()), Affinity)
    with pytest.raises(ValueError, match="unknown routing policy 'random'"):
        make_policy("random")
    with pytest.raises(InvalidArgument, match="'random' is not one of least-busy, round-robin, "):
        config.RouterConfig(policy="random", auth="none").validate()


# --- the ring -------------------------------------------------------------------------------

KEYS = range(20_000)


def owners(ring: HashRing) -> dict[int, str]:
    return {k: ring.owner(k * 0x9E3779B97F4A7C15 % 2**64) for k in KEYS}


def test_adding_a_replica_moves_about_one_key_in_n_all_to_it() -> None:
    four = [f"10.0.0.{i}:50061" for i in range(4)]
    before, after = owners(HashRing(four)), owners(HashRing([*four, "10.0.0.9:50061"]))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert {after[k] for k in moved} == {"10.0.0.9:50061"}
    assert 0.15 < len(moved) / len(KEYS) < 0.25  # 1/5 expected
    shares = Counter(after.values())
    assert all(0.15 < n / len(KEYS) < 0.25 for n in shares.values()), shares


def test_removing_a_replica_moves_only_its_own_keys_spread_over_the_rest() -> None:
    five = [f"10.0.0.{i}:50061" for i in range(5)]
    before, after = owners(HashRing(five)), owners(HashRing(five[1:]))
    moved = [k for k in KEYS if before[k] != after[k]]
    assert moved == [k for k in KEYS if before[k] == five[0]]
    assert 0.15 < len(moved) / len(KEYS) < 0.25
    assert set(Counter(after[k] for k in moved)) == set(five[1:])


def test_the_ring_walk_visits_every_address_once_starting_at_the_owner() -> None:
    ring = HashRing(["a:1", "b:1", "c:1", "a:1"])
    for key in (0, 2**63, 2**64 - 1, 12345):
        walk = list(ring.walk(key))
        assert sorted(walk) == ["a:1", "b:1", "c:1"] and walk[0] == ring.owner(key)
    assert list(HashRing([]).walk(1)) == []


# --- affinity -------------------------------------------------------------------------------


def test_the_same_key_lands_on_the_same_replica_and_keys_spread() -> None:
    candidates, seen = replicas(0, 0, 0), list[Outcome]()
    policy = affinity(seen)
    homes = {name: policy.pick(candidates, session(name)) for name in map(str, range(60))}
    for name, home in homes.items():
        assert policy.pick(list(reversed(candidates)), session(name)) is home
    assert all(20 * 0.5 < n < 20 * 1.5 for n in Counter(r.name for r in homes.values()).values())
    assert set(seen) == {Outcome.HIT} and len(seen) == 120
    # sessions belong to tenants: the same name of another tenant is another key
    assert policy.hashed(session("x", "t1")) != policy.hashed(session("x", "t2"))


def test_a_replica_beyond_the_bound_sends_its_keys_round_the_ring() -> None:
    candidates, seen = replicas(0, 0, 0), list[Outcome]()
    policy = affinity(seen, load_factor=1.25)
    key = session("s1")
    home = policy.pick(candidates, key)
    walk = list(HashRing(r.address for r in candidates).walk(policy.hashed(key) or 0))
    second = next(r for r in candidates if r.address == walk[1])
    assert walk[0] == home.address
    # bound = 1.25 x mean + 1; with the others idle the home may hold x <= 1.25 x / 3 + 1,
    # that is a load of x <= 12/7 = 1.714
    home.inflight, home.inflight_tokens = 1, 180  # load 1 + 180/256 = 1.703
    assert policy.pick(candidates, key) is home
    home.inflight_tokens = 184  # load 1.719
    assert [policy.pick(candidates, key) for _ in range(5)] == [second] * 5  # the same one
    assert seen == [Outcome.HIT, Outcome.HIT] + [Outcome.FALLBACK] * 5
    # the bound grows with the mean: with everyone busy, the home keeps its key
    for r in candidates:
        r.inflight = 6
    home.inflight = 8  # 8.72 <= 1.25 x (12 + 8.72) / 3 + 1 = 9.63
    assert policy.pick(candidates, key) is home


def test_without_a_key_affinity_is_least_busy() -> None:
    candidates, seen = replicas(3, 0, 2), list[Outcome]()
    policy = affinity(seen, prefix_chars=0, prefix_tokens=0)
    text = RouteKey(model="m", prefix="some prompt", token_ids=(1, 2, 3))
    assert policy.hashed(text) is None
    assert {policy.pick(candidates, text).name for _ in range(10)} == {"r1"}
    assert seen == [Outcome.NO_KEY] * 10
    assert policy.hashed(session("s")) is not None  # sessions still count


def test_a_session_beats_the_prompt_and_prefixes_are_cut_at_the_setting() -> None:
    policy = affinity(prefix_chars=8, prefix_tokens=3)
    a = RouteKey(model="m", tenant="t", session="s", prefix="one prompt")
    b = RouteKey(model="m", tenant="t", session="s", prefix="another prompt", token_ids=(9,))
    assert policy.hashed(a) == policy.hashed(b) == policy.hashed(session("s"))
    assert policy.hashed(RouteKey(model="m", prefix="12345678-a")) == policy.hashed(
        RouteKey(model="m", prefix="12345678-b")
    )
    assert policy.hashed(RouteKey(model="m", prefix="1234567-ab")) != policy.hashed(
        RouteKey(model="m", prefix="1234568-ab")
    )
    assert policy.hashed(RouteKey(model="m", token_ids=(1, 2, 3, 4))) == policy.hashed(
        RouteKey(model="m", token_ids=(1, 2, 3, 5))
    )
    assert policy.hashed(RouteKey(model="m", token_ids=(1, 2, 4))) != policy.hashed(
        RouteKey(model="m", token_ids=(1, 2, 3))
    )


# --- the route key of a request -------------------------------------------------------------


def key_of(request: gen.GenerateRequest, *metadata: tuple[str, str]) -> RouteKey:
    return route_key(request, grpc.aio.Metadata(*metadata), label="m", tenant="t")


def test_the_route_key_reads_the_session_header_and_the_prompts_start() -> None:
    chat = gen.GenerateRequest(model="m", instructions="be brief")
    chat.messages.add(role="user", content="hello")
    key = key_of(chat, ("traceparent", "x"), (SESSION_HEADER, "conv-7"))
    assert (key.model, key.label, key.tenant, key.session) == ("m", "m", "t", "conv-7")
    assert key.prefix.startswith("be brief") and "user" in key.prefix and "hello" in key.prefix
    # what the prefix reads: role and content apart, so moving text between them is another key
    other = gen.GenerateRequest(model="m", instructions="be brief")
    other.messages.add(role="userhello", content="")
    assert key_of(other).prefix != key.prefix
    assert key_of(gen.GenerateRequest(model="m", prompt="p")).session == ""
    ids = key_of(gen.GenerateRequest(model="m", instructions="x", token_ids=range(5000)))
    assert (ids.prefix, ids.token_ids) == ("", tuple(range(2048)))


def test_a_long_conversation_is_cut_not_copied_and_a_long_session_is_refused() -> None:
    turns = [("user", "x" * 5000)] * 1000  # 5 MB of text
    text = prompt_prefix(instructions="sys", messages=iter(turns), prompt="")
    assert len(text) == MAX_PREFIX_CHARS and text.startswith("sys")
    request = gen.GenerateRequest(model="m", prompt="p")
    assert key_of(request, (SESSION_HEADER, "s" * MAX_SESSION_CHARS)).session
    with pytest.raises(InvalidArgument) as e:
        key_of(request, (SESSION_HEADER, "s" * (MAX_SESSION_CHARS + 1)))
    (violation,) = e.value.field_violations
    assert (
        violation.field == SESSION_HEADER and "257 characters; at most 256" in violation.description
    )


def test_the_http_body_gives_prompt_cache_key_as_the_session() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert requests.chat({**body, "prompt_cache_key": "conv-1"}, None).session == "conv-1"
    assert requests.chat(body, None).session == ""
    for bad, why in ((5, "must be a string"), ("k" * 300, "300 characters; at most 256")):
        with pytest.raises(InvalidArgument) as e:
            requests.chat({**body, "prompt_cache_key": bad}, None)
        (violation,) = e.value.field_violations
        assert violation.field == "prompt_cache_key" and why in violation.description


# --- the catalog ----------------------------------------------------------------------------


def catalog_violations(table: dict[str, object]) -> list[str]:
    with pytest.raises(InvalidArgument) as e:
        parse_catalog({"a": {"path": "p", **table}})
    return [f"{v.field}: {v.description}" for v in e.value.field_violations]


def test_a_catalog_model_names_its_policy_and_knobs_and_mistakes_name_their_field() -> None:
    (model,) = parse_catalog(
        {
            "a": {
                "path": "p",
                "routing": "affinity",
                "affinity_load_factor": 2,
                "affinity_prefix_chars": 0,
            }
        }
    )
    assert (model.routing, model.affinity) == (
        "affinity",
        AffinitySettings(load_factor=2, prefix_chars=0, prefix_tokens=64),
    )
    (default,) = parse_catalog({"a": {"path": "p"}})
    assert (default.routing, default.affinity) == ("", AffinitySettings())
    assert catalog_violations(
        {
            "routing": "sticky",
            "affinity_load_factor": 0.5,
            "affinity_prefix_chars": -1,
            "affinity_prefix_tokens": 5000,
        }
    ) == [
        "models.a.routing: 'sticky' is not one of least-busy, round-robin, power-of-two, affinity",
        "models.a.affinity_load_factor: 0.5 is not a number of at least 1.0 (1.0: at most one "
        "request above the mean load)",
        f"models.a.affinity_prefix_chars: must be 0 to {MAX_PREFIX_CHARS}",
        "models.a.affinity_prefix_tokens: must be 0 to 2048",
    ]
    assert catalog_violations({"affinity_load_factor": float("nan")})[0].startswith(
        "models.a.affinity_load_factor: nan is not a number"
    )
    assert catalog_violations(
        {"affinity_load_factor": "1.5", "routing": 1, "affinity_prefix_chars": 1.5}
    ) == [
        "models.a.affinity_load_factor: must be a number",
        "models.a.routing: must be a string",
        "models.a.affinity_prefix_chars: must be an integer",
    ]
