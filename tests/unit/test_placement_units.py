"""Unit tests of placement without I/O: the catalog, the plan, the admin CLI's parsing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from meshllm.api.errors import Cancelled, InvalidArgument, MeshError
from meshllm.api.spec import ENGINES, ModelSpec
from meshllm.api.types import LoadReport, ReplicaState, ReplicaStatus
from meshllm.client._cli_admin import overrides
from meshllm.client.local import CatalogEntry, LocalMesh, LocalMeshConfig
from meshllm.replica.engines import engine_names
from meshllm.router.config import PlacementConfig, RouterConfig, read_config_file
from meshllm.router.placement import CatalogModel, parse_catalog, plan
from meshllm.router.placement.control import Placement
from meshllm.router.registry import Registry, Replica
from meshllm.router.replica_client import REMOVED

DEMO = CatalogModel.of(id="demo", path="demo", desired_replicas=2, max_replicas=3)
NOW, STALE = 100.0, 2.0


def violations(tables: dict[str, object]) -> list[str]:
    with pytest.raises(InvalidArgument) as e:
        parse_catalog(tables)
    return [f"{v.field}: {v.description}" for v in e.value.field_violations]


def test_catalog_tables_become_models_and_every_mistake_names_its_field() -> None:
    (model,) = parse_catalog(
        {
            "qwen": {
                "path": "/m/q",
                "device": "cuda",
                "desired_replicas": 2,
                "options": {"cache_size": "8192"},
            }
        }
    )
    assert (
        model.id,
        model.spec.engine,
        model.spec.options,
        model.fits("cuda:1"),
        model.fits("cpu"),
    ) == ("qwen", "ctranslate2", {"cache_size": "8192"}, True, False)
    assert violations({"a": {"path": 3, "speed": 1, "id": "x"}}) == [
        "models.a.path: must be a string",
        "models.a.speed: unknown setting",
        "models.a.id: comes from the table name; remove it",
    ]
    assert violations(
        {
            "a": {
                "path": "p",
                "engine": "vllm",
                "device": "tpu",
                "desired_replicas": 3,
                "max_replicas": 2,
                "inter_threads": -1,
            }
        }
    ) == [
        "models.a.engine: 'vllm' is not one of ctranslate2, exllamav3, fake, sim",
        "models.a.device: 'tpu' is not 'cpu', 'cuda' or ''",
        "models.a.inter_threads: must not be negative",
        "models.a.desired_replicas: 3 is above max_replicas 2",
    ]
    assert violations(
        {"b": {"desired_replicas": True}, "c": {"path": "p", "options": {"k": 1}}}
    ) == [
        "models.b.desired_replicas: must be an integer",
        'models.c.options: must be a table of strings, e.g. options = { cache_size = "8192" }',
    ]
    assert violations({"d": {}}) == ["models.d.path: is required"]


def test_the_router_config_file_carries_the_catalog(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(
        '[router]\nauth = "none"\n[router.discovery]\nreplicas = ["a:1"]\n'
        '[models.demo]\npath = "demo"\ndesired_replicas = 1\n'
    )
    config = RouterConfig.from_mapping(read_config_file(path)).validate()
    assert config.models == (CatalogModel.of(id="demo", path="demo", desired_replicas=1),)
    path.write_text('[model.demo]\npath = "demo"\n')  # a typo'd table is not silently ignored
    with pytest.raises(InvalidArgument, match="unknown tables model"):
        read_config_file(path)
    with pytest.raises(InvalidArgument, match="appears twice"):
        RouterConfig(auth="none", models=(DEMO, DEMO)).validate()


def test_the_router_knows_every_engine_a_replica_has() -> None:
    assert sorted(ENGINES) == engine_names()


def test_overrides_replace_fields_merge_options_and_are_checked() -> None:
    base = replace(DEMO, spec=replace(DEMO.spec, options={"a": "1", "b": "2"}))
    changed = base.with_overrides({"max_batch_size": 8, "options": {"b": "3"}, "path": ""})
    assert (changed.spec.max_batch_size, changed.spec.options, changed.spec.path) == (
        8,
        {"a": "1", "b": "3"},
        "demo",
    )
    with pytest.raises(InvalidArgument, match=r"models\.demo\.engine"):
        base.with_overrides({"engine": "vllm"})
    spec = overrides(["max_batch_size=8", "options.cache_size=8192", "compute_type=int8"])
    assert (spec["max_batch_size"], spec["options"], spec["compute_type"]) == (
        8,
        {"cache_size": "8192"},
        "int8",
    )
    for bad in ("max_batch_size=eight", "speed=1", "id=x", "path"):
        with pytest.raises(InvalidArgument, match="--set"):
            overrides([bad])


def replicas(*states: tuple[ReplicaState, str, str]) -> tuple[Registry, list[Replica]]:
    """Replicas r0, r1, ... reporting (state, model, device) now."""
    registry = Registry(stale_after_s=STALE, clock=lambda: NOW)
    out = []
    for i, (state, model, device) in enumerate(states):
        replica = registry.add(f"10.0.0.{i}:1")
        registry.update(
            replica,
            LoadReport(
                replica_id=f"r{i}",
                state=state,
                model=model,
                queued=0,
                running=0,
                tokens_in_flight=0,
                tokens_per_second=0.0,
                device=device,
            ),
        )
        out.append(replica)
    return registry, out


E, R, L, D, F = (
    ReplicaState.EMPTY,
    ReplicaState.READY,
    ReplicaState.LOADING,
    ReplicaState.DRAINING,
    ReplicaState.FAILED,
)


def test_placement_fills_idle_replicas_in_name_order_up_to_the_desired_count() -> None:
    _, rs = replicas(
        (E, "", "cpu"), (R, "demo", "cpu"), (F, "", "cpu"), (E, "", "cuda:0"), (E, "", "cpu")
    )
    assert [r.name for r in plan.to_load(rs, DEMO, 2, NOW, STALE)] == ["r0"]
    assert [r.name for r in plan.to_load(rs, DEMO, 9, NOW, STALE)] == ["r0", "r2", "r3", "r4"]
    gpu_only = replace(DEMO, device="cuda")
    assert [r.name for r in plan.to_load(rs, gpu_only, 9, NOW, STALE)] == ["r3"]
    rs[0].claim = "other"  # a load this router started elsewhere is not idle
    assert [r.name for r in plan.to_load(rs, DEMO, 3, NOW, STALE)] == ["r2", "r3"]
    rs[0].claim = "demo"  # and it counts for its model at once
    assert plan.to_load(rs, DEMO, 2, NOW, STALE) == []
    rs[4].connected = False  # silent replicas are never chosen
    assert [r.name for r in plan.to_load(rs, DEMO, 9, NOW, STALE)] == ["r2", "r3"]


def test_scale_down_frees_failed_then_loading_then_drained_then_the_least_busy() -> None:
    _, rs = replicas(
        (R, "demo", "cpu"),
        (L, "demo", "cpu"),
        (R, "demo", "cpu"),
        (D, "demo", "cpu"),
        (R, "other", "cpu"),
    )
    rs[0].inflight, rs[2].inflight = 3, 1
    assert [r.name for r in plan.hosting(rs, "demo")] == ["r0", "r1", "r2", "r3"]
    assert [r.name for r in plan.to_unload(rs, "demo", keep=1)] == ["r1", "r3", "r2"]
    assert [r.name for r in plan.to_unload(rs, "demo", keep=4)] == []


def test_pending_says_why_a_model_has_fewer_replicas_than_wanted() -> None:
    _, rs = replicas((R, "demo", "cpu"), (L, "demo", "cpu"), (R, "other", "cpu"))
    assert plan.pending(rs, DEMO, 1, NOW, STALE) == ""
    assert plan.pending(rs, DEMO, 3, NOW, STALE, failure="r9: out of memory") == (
        "1 of 3 ready: 1 loading; last load failed: r9: out of memory; no idle replica for 1 more"
    )
    assert plan.pending(rs, replace(DEMO, device="cuda"), 3, NOW, STALE) == (
        "1 of 3 ready: 1 loading; no idle replica on cuda for 1 more"
    )


def test_meshllm_up_without_a_config_puts_its_model_on_every_replica(tmp_path: Path) -> None:
    mesh = LocalMesh(LocalMeshConfig(replicas=3, model=str(tmp_path / "my-model")))
    path = mesh._router_config()
    assert mesh.catalog == (CatalogEntry(id="my-model", desired_replicas=3),)
    # the router reads the same file into the same catalog
    assert read_config_file(path)["models"] == (
        CatalogModel.of(id="my-model", path=str(tmp_path / "my-model"), desired_replicas=3),
    )
    mesh.stop()
    assert not path.exists()


@pytest.mark.parametrize("turns", range(6))
async def test_closing_placement_while_a_replica_changes_state_does_not_hang(turns: int) -> None:
    """A router told to stop just as a replica changes state (``meshllm up`` killed: the
    replica drains while the router closes) must not lose the cancel of its placement loop."""
    registry = Registry(stale_after_s=STALE, clock=lambda: NOW)
    catalog = (CatalogModel.of(id="demo", path="demo"),)
    placement = Placement(PlacementConfig(), catalog, registry, FakeClients())
    placement.start()
    for _ in range(5):
        await asyncio.sleep(0)  # into its wait for a change
    placement.changed()
    for _ in range(turns):  # the cancel lands at every step of the wake-up
        await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await placement.close()


class FakeReplica:
    """A test double of one replica's client: loads answer with ``state`` (or raise ``error``)."""

    def __init__(
        self, state: ReplicaState = ReplicaState.READY, error: MeshError | None = None
    ) -> None:
        self.state, self.error, self.loaded = state, error, list[str]()
        self.during_load: Callable[[], None] = lambda: None

    async def load(self, spec: ModelSpec, *, timeout: float) -> ReplicaStatus:
        self.loaded.append(spec.id)
        self.during_load()
        if self.error is not None:
            raise self.error
        return ReplicaStatus(replica_id="r0", state=self.state, spec=spec, error="out of memory")

    async def unload(self, model: str, *, drain_s: float, timeout: float) -> ReplicaStatus:
        return ReplicaStatus(replica_id="r0", state=ReplicaState.EMPTY)

    async def drain(self, *, timeout: float) -> ReplicaStatus:
        return ReplicaStatus(replica_id="r0", state=ReplicaState.DRAINING)

    async def undrain(self, *, timeout: float) -> ReplicaStatus:
        return ReplicaStatus(replica_id="r0", state=ReplicaState.READY)

    async def status(self, *, timeout: float) -> ReplicaStatus:
        return ReplicaStatus(replica_id="r0", state=self.state)


class FakeClients:
    def __init__(self, client: FakeReplica | None = None) -> None:
        self.replica_client = client

    def client(self, replica: Replica) -> FakeReplica | None:
        return self.replica_client


async def test_failed_loads_are_remembered_and_removed_replicas_are_not_the_models_fault() -> None:
    """Placement on domain types alone: no gRPC server, a test double per replica."""
    registry, (r0,) = replicas((E, "", "cpu"))
    entry = CatalogModel.of(id="demo", path="demo", desired_replicas=1)
    failing = FakeReplica(ReplicaState.FAILED)
    placement = Placement(
        PlacementConfig(), (entry,), registry, FakeClients(failing), clock=lambda: NOW
    )
    r0.connected = False  # no report will confirm the answer: do not wait for one
    assert await placement.loads.start(r0, entry) == "r0: out of memory"
    assert failing.loaded == ["demo"] and r0.claim == ""
    assert placement.loads.failures["demo"].reason == "r0: out of memory"
    assert placement.loads.backing_off("demo")

    removed = FakeReplica(error=Cancelled("the replica was removed", reason=REMOVED))
    clients = FakeClients(removed)
    placement = Placement(PlacementConfig(), (entry,), registry, clients, clock=lambda: NOW)
    # discovery drops it while the load is under way
    removed.during_load = lambda: setattr(clients, "replica_client", None)
    assert "CANCELLED" in await placement.loads.start(r0, entry)
    assert placement.loads.failures == {}
