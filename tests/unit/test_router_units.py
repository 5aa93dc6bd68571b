"""Unit tests of the router's pure logic: load scores, policies, the registry, config, discovery."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import grpc
import pytest

from meshllm.api.errors import InvalidArgument, status_name
from meshllm.api.types import LoadReport, ReplicaState
from meshllm.router.balancer import LeastBusy, RoundRobin, load
from meshllm.router.config import RouterConfig, read_config_file
from meshllm.router.discovery import join_host_port, read_replicas_file
from meshllm.router.ejection import EjectionWatch
from meshllm.router.registry import Registry, Replica


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(
    model: str = "m", state: ReplicaState = ReplicaState.READY, queued: int = 0, tokens: int = 0
) -> LoadReport:
    return LoadReport(
        replica_id="",
        state=state,
        model=model,
        queued=queued,
        running=0,
        tokens_in_flight=tokens,
        tokens_per_second=0.0,
    )


def registry_with(*reports: LoadReport) -> tuple[Registry, list[Replica], Clock]:
    clock = Clock()
    registry = Registry(stale_after_s=2.0, clock=clock)
    replicas = []
    for i, r in enumerate(reports):
        replica = registry.add(f"10.0.0.{i}:1")
        registry.update(replica, r)
        replicas.append(replica)
    return registry, replicas, clock


def test_load_counts_own_work_exactly_and_adds_other_routers_work_from_reports() -> None:
    registry, (a,), _ = registry_with(report())
    with registry.lease(a, tokens=300) as lease:
        lease.received(100)
        assert load(a, tokens_per_request=100) == 1 + 200 / 100
        # The report shows our request (running, 200 tokens left) and another router's 2 queued
        # requests with 400 tokens: only those count on top of our own figures.
        registry.update(
            a,
            LoadReport(
                replica_id="",
                state=ReplicaState.READY,
                model="m",
                queued=2,
                running=1,
                tokens_in_flight=600,
                tokens_per_second=0.0,
            ),
        )
        assert (a.others_requests, a.others_tokens) == (2, 400)
        assert load(a, tokens_per_request=100) == 3 + 600 / 100
        lease.received(150)  # fresh progress counts at once, without waiting for a report
        assert load(a, tokens_per_request=100) == 3 + 450 / 100
    assert load(a, tokens_per_request=100) == 2 + 400 / 100
    # A report that lags behind our own finished work never inflates the load.
    registry.update(a, report(queued=0, tokens=0))
    assert load(a, tokens_per_request=100) == 0


def test_least_busy_picks_the_lowest_load() -> None:
    _, (a, b, c), _ = registry_with(report(queued=1), report(tokens=1024), report())
    c.inflight = 1
    assert LeastBusy(256).pick([a, b, c]) in (a, c)  # a: 1 (another router's), b: 4, c: 1
    c.inflight = 2
    assert LeastBusy(256).pick([a, b, c]) is a


def test_least_busy_breaks_ties_at_random() -> None:
    _, replicas, _ = registry_with(report(), report(), report())
    policy = LeastBusy(256, rng=random.Random(7))
    counts = Counter(policy.pick(replicas).address for _ in range(300))
    assert set(counts) == {r.address for r in replicas}
    assert min(counts.values()) > 60


def test_round_robin_takes_turns_whatever_the_load() -> None:
    _, (a, b, c), _ = registry_with(report(queued=50), report(), report())
    policy = RoundRobin()
    assert [policy.pick([c, a, b]) for _ in range(6)] == [a, b, c, a, b, c]


def test_candidates_are_ready_fresh_listed_replicas_of_the_model() -> None:
    registry, (ok, _draining, other, stale, gone, ejected), clock = registry_with(
        report(),
        report(state=ReplicaState.DRAINING),
        report(model="x"),
        report(),
        report(),
        report(),
    )
    stale.reported_at = clock.now - 5.0
    registry.remove(gone.address)
    ejected.eject("connection refused")
    assert registry.candidates("m") == [ok]
    assert registry.candidates("m", exclude=[ok]) == []
    assert registry.knows("x") and not registry.knows("y")
    assert {m: [r.address for r in rs] for m, rs in registry.ready_models().items()} == {
        "m": [ok.address],
        "x": [other.address],
    }
    registry.update(ejected, report())  # a new report re-admits it
    assert ejected in registry.candidates("m")


def test_lease_counts_requests_and_tokens_until_it_ends() -> None:
    registry, (a,), _ = registry_with(report())
    with registry.lease(a, tokens=100) as lease:
        assert (a.inflight, a.inflight_tokens) == (1, 100)
        lease.received(30)
        assert a.inflight_tokens == 70
        lease.received(500)  # never below what was reserved
        assert a.inflight_tokens == 0
    assert (a.inflight, a.inflight_tokens, a.served_total) == (0, 0, 1)
    with pytest.raises(RuntimeError), registry.lease(a, tokens=10):
        raise RuntimeError
    assert (a.inflight, a.inflight_tokens) == (0, 0)


def test_config_errors_name_every_bad_field() -> None:
    bad = RouterConfig.from_flat(
        {
            "policy": "fastest",
            "replicas": ("nohost",),
            "max_attempts": 0,
            "refresh_s": 0,
            "auth": "none",
        }
    )
    with pytest.raises(InvalidArgument) as e:
        bad.validate()
    fields = {v.field for v in e.value.field_violations}
    assert fields == {"policy", "replicas", "max_attempts", "refresh_s"}


def test_config_file_is_checked_for_unknown_settings(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(
        '[router]\npolicy = "round-robin"\n[router.discovery]\nreplicas = ["a:1", "b:2"]\n'
    )
    settings = {**read_config_file(path), "auth": "none"}
    assert RouterConfig.from_mapping(settings).validate().discovery.replicas == ("a:1", "b:2")
    path.write_text("[router]\nreplica = 3\n")
    with pytest.raises(InvalidArgument, match="unknown \\[router\\] settings: replica"):
        read_config_file(path)
    path.write_text('[router]\nport = "50051"\n[router.discovery]\nrefresh_s = 2\n')
    with pytest.raises(InvalidArgument, match="port must be an integer"):
        read_config_file(path)
    path.write_text("[router.discovery]\nrefresh_s = 2\n")
    assert read_config_file(path) == {"discovery": {"refresh_s": 2.0}}


def test_replicas_file_skips_comments_and_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "replicas"
    path.write_text("# mesh\nr1:50061\n\n  r2:50061  # second\nnot-an-address\n[::1]:7\n")
    assert read_replicas_file(path) == {"r1:50061", "r2:50061", "[::1]:7"}
    assert join_host_port("::1", 7) == "[::1]:7" and join_host_port("10.1.2.3", 7) == "10.1.2.3:7"


def test_status_name_names_how_a_request_ended() -> None:
    rpc = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone"
    )
    assert [
        status_name(e)
        for e in (
            None,
            InvalidArgument("x"),
            rpc,
            asyncio.CancelledError(),
            GeneratorExit(),
            ValueError(),
        )
    ] == ["OK", "INVALID_ARGUMENT", "UNAVAILABLE", "CANCELLED", "CANCELLED", "INTERNAL"]


def test_a_flat_router_table_still_loads_and_a_setting_given_twice_is_refused(
    tmp_path: Path,
) -> None:
    """Config files from before the sub-tables (flat names in [router]) keep working."""
    path = tmp_path / "router.toml"
    path.write_text('[router]\nstale_after_s = 3\nquota_store = "redis"\ntls_cert = "c.pem"\n')
    assert read_config_file(path) == {
        "discovery": {"stale_after_s": 3.0},
        "quota": {"store": "redis"},
        "tls": {"cert": "c.pem"},
    }
    path.write_text("[router]\nstale_after_s = 3\n[router.discovery]\nstale_after_s = 4\n")
    with pytest.raises(InvalidArgument, match="are the same setting: set one"):
        read_config_file(path)


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_an_ejection_ends_an_unstarted_attempt_at_once_a_started_one_once_silent() -> None:
    replica = Replica(address="a:1")
    waiting, streaming = FakeCall(), FakeCall()
    unstarted = EjectionWatch(replica, waiting, quiet_s=0.2)  # type: ignore[arg-type]
    started = EjectionWatch(replica, streaming, quiet_s=0.2)  # type: ignore[arg-type]
    started.progress()
    replica.eject("no load report for 2.0s")
    assert waiting.cancelled and unstarted.fired and unstarted.why == "no load report for 2.0s"
    for _ in range(3):  # chunks keep coming: an ejected replica that still streams goes on
        await asyncio.sleep(0.1)
        started.progress()
        assert not streaming.cancelled
    await asyncio.sleep(0.3)  # silent for quiet_s after the ejection
    assert streaming.cancelled and started.fired
    for watch in (unstarted, started):
        watch.close()
    assert not replica.on_eject


async def test_a_closed_watch_cancels_nothing() -> None:
    replica, call = Replica(address="a:1"), FakeCall()
    watch = EjectionWatch(replica, call, quiet_s=0.05)  # type: ignore[arg-type]
    watch.progress()
    replica.eject("gone")
    watch.close()
    await asyncio.sleep(0.1)
    assert not call.cancelled and not watch.fired
