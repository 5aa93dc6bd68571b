"""Unit tests of outlier ejection (router/outliers.py) and its use by the registry: every rule on
a fake clock, exact."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from meshllm.api.errors import InvalidArgument
from meshllm.api.types import LoadReport, ReplicaState
from meshllm.router.config import OutlierConfig, RouterConfig, read_config_file
from meshllm.router.outliers import (
    RAMP_START,
    Outcome,
    OutlierDetector,
    OutlierRecord,
    outcome_of,
)
from meshllm.router.registry import Registry, Replica

OK, FAIL, NEUTRAL = Outcome.SUCCESS, Outcome.FAILURE, Outcome.NEUTRAL


class FixedDraw(random.Random):
    """A random source whose every draw is ``value``: a ramp share above it admits."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class Mesh:
    """One detector and the records of a model's replicas, on a clock the test moves."""

    def __init__(self, replicas: int = 3, draw: float = 0.5, **config: object) -> None:
        self.config = OutlierConfig(**config)  # type: ignore[arg-type]
        self.detector = OutlierDetector(self.config, FixedDraw(draw))
        self.records = [OutlierRecord() for _ in range(replicas)]
        self.now = 1_000.0

    def send(self, *outcomes: Outcome, to: int = 0, every_s: float = 0.0) -> list[float]:
        """Record ``outcomes`` on replica ``to``; the durations of the ejections they caused."""
        ejected = []
        for outcome in outcomes:
            e = self.detector.record(self.records[to], outcome, self.now, self.records)
            if e is not None:
                ejected.append(e.duration_s)
            self.now += every_s
        return ejected

    def ejected(self, which: int = 0) -> bool:
        return self.records[which].ejected(self.now)

    def share(self, which: int = 0) -> float:
        return self.detector.share(self.records[which], self.now)


# --- which outcomes count ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
    ],
)
def test_replica_failures_count_as_failures(code: grpc.StatusCode) -> None:
    assert outcome_of(code) is Outcome.FAILURE


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OK,
    ],
)
def test_callers_own_errors_and_full_queues_say_nothing_of_the_replica(
    code: grpc.StatusCode,
) -> None:
    assert outcome_of(code) is Outcome.NEUTRAL


def test_neutral_outcomes_neither_dilute_the_rate_nor_break_a_run_of_failures() -> None:
    mesh = Mesh(min_requests=100)  # only the run of 5 can eject
    assert mesh.send(FAIL, FAIL, NEUTRAL, NEUTRAL, FAIL, FAIL) == []
    assert mesh.send(NEUTRAL, FAIL) == [5.0]
    rate = Mesh(consecutive_failures=0)  # only the rate can eject
    assert rate.send(OK, FAIL, NEUTRAL, NEUTRAL, NEUTRAL, NEUTRAL, OK, FAIL) == []  # 2 of 4
    assert rate.send(FAIL) == [5.0]  # 3 of 5: the neutral ones are not in the window


# --- the two rules -------------------------------------------------------------------------------


def test_failure_rate_ejects_at_the_share_within_the_window() -> None:
    mesh = Mesh(consecutive_failures=0)
    assert mesh.send(OK, FAIL, OK, FAIL, OK) == []  # 2 of 5: below 0.5
    assert mesh.send(FAIL) == [5.0]  # 3 of 6
    assert mesh.ejected() and mesh.records[0].ejection is not None
    assert mesh.records[0].ejection.why == "3 of 6 attempts failed within 10 s"


def test_the_rate_waits_for_min_requests() -> None:
    mesh = Mesh(consecutive_failures=0, min_requests=5)
    assert mesh.send(FAIL, FAIL, FAIL, FAIL) == []  # 100 % of 4: too few to judge
    assert mesh.send(FAIL) == [5.0]


def test_the_rate_forgets_attempts_older_than_the_window() -> None:
    mesh = Mesh(consecutive_failures=0, window_s=10.0)
    assert mesh.send(FAIL, FAIL, FAIL, FAIL, every_s=1.0) == []  # t = 0..3
    mesh.now += 8.0  # t = 12: the first three are 10 s old or more
    assert mesh.send(OK) == []  # 4 of 5 without the window; in it 1 of 2
    assert mesh.send(OK, OK, FAIL) == []  # 2 of 5
    assert mesh.send(FAIL) == [5.0]  # 3 of 6


def test_consecutive_failures_eject_whatever_the_rate() -> None:
    mesh = Mesh(min_requests=1_000, consecutive_failures=5)  # the rate cannot eject
    assert mesh.send(*[OK] * 50, FAIL, FAIL, FAIL, FAIL) == []
    assert mesh.send(OK, FAIL, FAIL, FAIL, FAIL) == []  # a success starts the count again
    assert mesh.send(FAIL) == [5.0]
    assert mesh.records[0].ejection is not None
    assert mesh.records[0].ejection.why == "5 attempts failed in a row"


def test_consecutive_zero_turns_that_rule_off() -> None:
    mesh = Mesh(min_requests=1_000, consecutive_failures=0)
    assert mesh.send(*[FAIL] * 20) == []


# --- how many may be out -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "percent", "ejectable"),
    [(4, 50, 2), (3, 50, 1), (10, 50, 5), (10, 10, 1), (3, 1, 1), (2, 100, 1), (1, 100, 0)],
)
def test_at_most_max_ejected_percent_and_never_the_last(
    replicas: int, percent: int, ejectable: int
) -> None:
    mesh = Mesh(replicas=replicas, max_ejected_percent=percent)
    for which in range(replicas):
        mesh.send(*[FAIL] * 5, to=which)
    assert sum(mesh.ejected(i) for i in range(replicas)) == ejectable


def test_zero_percent_ejects_none() -> None:
    mesh = Mesh(replicas=4, max_ejected_percent=0)
    assert mesh.send(*[FAIL] * 20) == []


def test_a_refused_ejection_happens_once_another_comes_back() -> None:
    mesh = Mesh(replicas=2, ramp_s=0.0)
    assert mesh.send(*[FAIL] * 5, to=0) == [5.0]
    assert mesh.send(*[FAIL] * 5, to=1) == []  # replica 0 is out: 1 is the last one
    mesh.now += 5.0  # replica 0 is back
    assert mesh.send(FAIL, to=1) == [5.0]  # still failing: its run goes on
    assert not mesh.ejected(0) and mesh.ejected(1)


# --- backoff and ramp ----------------------------------------------------------------------------


def test_ejection_time_grows_with_each_ejection_in_a_row_and_is_capped() -> None:
    mesh = Mesh(base_ejection_s=5.0, max_ejection_s=12.0, ramp_s=10.0)
    durations = []
    for _ in range(4):
        durations += mesh.send(*[FAIL] * 5)
        mesh.now += durations[-1]  # the ejection ends: the ramp begins
        durations += mesh.send(FAIL)  # one failure in the ramp ejects again, for longer
        mesh.now += durations[-1]
    assert durations == [5.0, 10.0, 12.0, 12.0, 12.0, 12.0, 12.0, 12.0]
    assert mesh.records[0].ejection is not None and mesh.records[0].ejection.count == 8


def test_the_ramp_raises_the_chance_of_being_a_candidate_linearly() -> None:
    mesh = Mesh(ramp_s=10.0)
    assert mesh.share() == 1.0
    mesh.send(*[FAIL] * 5)
    assert mesh.share() == 0.0
    mesh.now += 4.999
    assert mesh.share() == 0.0  # still ejected
    mesh.now += 0.001
    assert mesh.share() == pytest.approx(RAMP_START)
    mesh.now += 5.0
    assert mesh.share() == pytest.approx(RAMP_START + (1 - RAMP_START) * 0.5)
    mesh.now += 5.0
    assert mesh.share() == 1.0 and mesh.records[0].ejection is None


def test_admits_draws_against_the_ramp_share() -> None:
    for draw, admitted_at in ((0.05, 0.0), (0.5, 4.5), (0.99, 9.9)):
        mesh = Mesh(ramp_s=10.0, draw=draw)
        record = mesh.records[0]
        mesh.send(*[FAIL] * 5)
        assert not mesh.detector.admits(record, mesh.now)  # ejected: no draw lets it in
        mesh.now += 5.0 + admitted_at - 0.2
        assert not mesh.detector.admits(record, mesh.now) or admitted_at == 0.0
        mesh.now += 0.4
        assert mesh.detector.admits(record, mesh.now), draw


def test_a_failure_during_the_ramp_ejects_again_for_longer() -> None:
    mesh = Mesh(ramp_s=10.0)
    assert mesh.send(*[FAIL] * 5) == [5.0]
    mesh.now += 5.0 + 9.0  # near the end of the ramp
    assert mesh.send(OK, OK, OK) == []
    assert mesh.send(FAIL) == [10.0]
    assert mesh.records[0].ejection is not None
    assert mesh.records[0].ejection.why == "an attempt failed during its re-admission ramp"


def test_a_clean_ramp_resets_the_count() -> None:
    mesh = Mesh(ramp_s=10.0)
    assert mesh.send(*[FAIL] * 5) == [5.0]
    mesh.now += 5.0
    assert mesh.send(FAIL) == [10.0]
    mesh.now += 10.0 + 10.0  # a whole ramp without a failure
    assert mesh.send(OK) == []
    assert mesh.records[0].ejections == 0
    assert mesh.send(*[FAIL] * 5) == [5.0]  # the base time again


def test_a_clean_ramp_with_no_traffic_counts_as_clean() -> None:
    mesh = Mesh(ramp_s=10.0)
    mesh.send(*[FAIL] * 5)
    mesh.now += 15.0
    assert mesh.send(*[FAIL] * 5) == [5.0]


def test_attempts_that_end_while_ejected_are_ignored() -> None:
    mesh = Mesh(ramp_s=0.0)
    assert mesh.send(*[FAIL] * 5) == [5.0]
    assert mesh.send(*[FAIL] * 20) == []  # sent before the ejection, ending after it
    mesh.now += 5.0
    assert mesh.send(FAIL, FAIL, FAIL, FAIL) == []  # a fresh window and run after it
    assert not mesh.ejected()


def test_the_note_says_how_long_and_why() -> None:
    mesh = Mesh(ramp_s=10.0)
    record = mesh.records[0]
    assert mesh.detector.note(record, mesh.now) == ""
    mesh.send(*[FAIL] * 5)
    mesh.now += 1.0
    assert mesh.detector.note(record, mesh.now) == (
        "ejected as an outlier for 4.0 s more (5 s, ejection 1 in a row): "
        "5 attempts failed in a row"
    )
    mesh.now += 9.0
    assert mesh.detector.note(record, mesh.now) == (
        "re-admitted after an outlier ejection: a candidate for 55% of picks, all in 5.0 s "
        "(ejected for: 5 attempts failed in a row)"
    )
    mesh.now += 5.0
    assert mesh.detector.note(record, mesh.now) == ""


# --- in the registry -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(model: str = "m") -> LoadReport:
    return LoadReport(
        replica_id="",
        state=ReplicaState.READY,
        model=model,
        queued=0,
        running=0,
        tokens_in_flight=0,
        tokens_per_second=0.0,
    )


def registry_of(
    count: int, draw: float = 0.5, **config: object
) -> tuple[Registry, list[Replica], Clock]:
    clock = Clock()
    detector = OutlierDetector(OutlierConfig(**config), FixedDraw(draw))  # type: ignore[arg-type]
    registry = Registry(stale_after_s=2.0, clock=clock, outliers=detector)
    replicas = [registry.add(f"10.0.0.{i}:1") for i in range(count)]
    for r in replicas:
        registry.update(r, report())
    return registry, replicas, clock


def later(registry: Registry, clock: Clock, seconds: float) -> None:
    """Move the clock; every replica reports again (a silent one would be stale)."""
    clock.now += seconds
    for r in registry.replicas.values():
        registry.update(r, report(r.report.model if r.report else "m"))


def fail(registry: Registry, replica: Replica, times: int = 5) -> list[float]:
    return [e.duration_s for _ in range(times) if (e := registry.ended(replica, FAIL))]


def test_an_ejected_replica_is_no_candidate_and_a_load_report_does_not_readmit_it() -> None:
    registry, (a, b, c), clock = registry_of(3)
    assert fail(registry, a) == [5.0]
    assert registry.candidates("m") == [b, c]
    assert not a.serves("m", clock(), 2.0) and a.connected
    registry.update(a, report())  # READY, empty queue: says nothing of its failures
    assert registry.candidates("m") == [b, c]
    assert a not in registry.ready_models()["m"]
    later(registry, clock, 4.9)
    assert registry.candidates("m") == [b, c]
    later(registry, clock, 0.1 + 10.0)  # the ejection and the ramp are over
    assert registry.candidates("m") == [a, b, c]


def test_connection_ejection_is_unchanged_a_report_readmits_it() -> None:
    registry, (a, b), _ = registry_of(2)
    registry.eject(a, "UNAVAILABLE: connection refused")
    assert registry.candidates("m") == [b]
    registry.update(a, report())
    assert registry.candidates("m") == [a, b]


def test_in_its_ramp_a_replica_is_a_candidate_by_chance() -> None:
    registry, (a, b), clock = registry_of(2, draw=0.5, ramp_s=10.0)
    fail(registry, a)
    later(registry, clock, 5.0 + 1.0)  # share 0.19: the draw of 0.5 leaves it out
    assert registry.candidates("m") == [b]
    assert registry.candidates("m", exclude=[b]) == [a]  # none else left: it takes the request
    later(registry, clock, 5.0)  # share 0.64
    assert registry.candidates("m") == [a, b]


def test_peers_are_the_models_replicas_that_take_work() -> None:
    registry, (a, b, c), _ = registry_of(3, max_ejected_percent=100)
    registry.update(c, report(model="other"))  # serves another model: not one of a's peers
    assert fail(registry, a) == [5.0]
    assert fail(registry, b) == []  # a and b serve m: b is the last one
    registry.eject(b, "gone")  # disconnected: not a peer of c's
    assert fail(registry, c) == []  # c is the only replica of "other"


def test_a_new_model_on_the_replica_starts_afresh() -> None:
    registry, (a, b), _ = registry_of(2)
    fail(registry, a)
    assert registry.candidates("m") == [b]
    registry.update(a, report(model=""))  # unloaded
    registry.update(a, report(model="m"))  # loaded again
    assert registry.candidates("m") == [a, b] and a.outlier.ejections == 0


def test_without_a_detector_nothing_is_ejected() -> None:
    registry = Registry(stale_after_s=2.0)
    a, b = registry.add("10.0.0.1:1"), registry.add("10.0.0.2:1")
    registry.update(a, report())
    registry.update(b, report())
    assert fail(registry, a, times=50) == []
    assert registry.candidates("m") == [a, b] and registry.outlier_note(a) == ""


# --- config --------------------------------------------------------------------------------------


def test_outlier_defaults() -> None:
    c = RouterConfig().outliers
    assert (c.enabled, c.window_s, c.min_requests, c.failure_rate, c.consecutive_failures) == (
        True,
        10.0,
        5,
        0.5,
        5,
    )
    assert (c.base_ejection_s, c.max_ejection_s, c.max_ejected_percent, c.ramp_s) == (
        5.0,
        60.0,
        50,
        10.0,
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"window_s": 0.0}, "outlier_window_s"),
        ({"min_requests": 0}, "outlier_min_requests"),
        ({"failure_rate": 0.0}, "outlier_failure_rate"),
        ({"failure_rate": 1.5}, "outlier_failure_rate"),
        ({"consecutive_failures": -1}, "outlier_consecutive_failures"),
        ({"base_ejection_s": -1.0}, "outlier_base_ejection_s"),
        ({"max_ejection_s": 4.0}, "outlier_max_ejection_s"),
        ({"max_ejected_percent": 101}, "outlier_max_ejected_percent"),
        ({"ramp_s": -1.0}, "outlier_ramp_s"),
    ],
)
def test_bad_outlier_settings_are_refused_by_flat_name(
    change: dict[str, object], field: str
) -> None:
    config = RouterConfig(auth="none", outliers=replace(OutlierConfig(), **change))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as e:
        config.validate()
    assert [v.field for v in e.value.field_violations] == [field]


def test_outliers_table_and_flat_names_load(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(
        '[router]\nauth = "none"\noutlier_ramp_s = 3.0\n'
        "[router.outliers]\nenabled = false\nmax_ejected_percent = 30\n"
    )
    config = RouterConfig.from_mapping(read_config_file(path)).validate()
    assert config.outliers == OutlierConfig(enabled=False, max_ejected_percent=30, ramp_s=3.0)
    flat = RouterConfig.from_flat({"auth": "none", "outlier_ejection": False}).validate()
    assert flat.outliers.enabled is False
    path.write_text('[router]\nauth = "none"\n[router.outliers]\nmax_ejected_percent = 50.5\n')
    with pytest.raises(InvalidArgument, match="max_ejected_percent must be an integer"):
        read_config_file(path)
