"""The command line's pure parts: value types, where the connection settings come from, the
batch heartbeat, and why ``meshllm up`` gives up (fast: no servers, no processes)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from meshllm.api.types import ReplicaState, ReplicaStatus
from meshllm.client._cli_args import (
    DEFAULT_TARGET,
    UsageError,
    add_connection_options,
    connection,
    levels,
    number,
    whole,
)
from meshllm.client._heartbeat import Counts, Heartbeat, duration
from meshllm.client.local import load_failures


def test_whole_and_number_types_refuse_out_of_range_values_by_name() -> None:
    assert whole(1, 10)("7") == 7
    for bad, words in (("0", "within 1..10"), ("11", "within 1..10"), ("x", "not a whole")):
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            whole(1, 10)(bad)
    ratio = number(0, high=1, below=True)
    assert ratio("0") == 0.0 and ratio("0.5") == 0.5
    for bad in ("1", "2", "-0.1", "nan", "inf", "abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            ratio(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="above 0"):
        number(0, above=True)("0")


def test_levels_are_sorted_unique_positive_whole_numbers() -> None:
    assert levels("8, 1,8,64") == (1, 8, 64)
    for bad in ("0", "abc", "", ",", "1,-2", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="1,8,64"):
            levels(bad)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_connection_options(p, default=None)
    return p.parse_args(argv)


def test_flags_beat_the_environment_which_beats_the_defaults(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  file-key \n")
    env = {"MESHLLM_TARGET": "env:1", "MESHLLM_API_KEY": "env-key"}
    assert connection(parse(), {}).target == DEFAULT_TARGET
    assert connection(parse(), {}).api_key is None
    from_env = connection(parse(), env)
    assert (from_env.target, from_env.api_key) == ("env:1", "env-key")
    flags = connection(parse("--target", "flag:2", "--api-key-file", str(key_file)), env)
    assert (flags.target, flags.api_key) == ("flag:2", "file-key")
    assert connection(parse("--api-key", "k"), env).api_key == "k"
    env_file = {"MESHLLM_API_KEY_FILE": str(key_file)}
    assert connection(parse(), env_file).api_key == "file-key"
    assert connection(parse(), {**env_file, **env}).api_key == "env-key"  # the key beats its file


def test_a_key_file_that_is_missing_or_empty_is_a_usage_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UsageError, match="--api-key-file: cannot read"):
        connection(parse("--api-key-file", str(tmp_path / "nosuch")), {})
    with pytest.raises(UsageError, match=r"MESHLLM_API_KEY_FILE: .* is empty"):
        connection(parse(), {"MESHLLM_API_KEY_FILE": str(empty)})
    with pytest.raises(UsageError, match="tls_ca"):  # TLS paths from the environment too
        connection(parse(), {"MESHLLM_TLS_CA": str(tmp_path / "nosuch.pem")})


def test_heartbeat_reports_progress_and_warns_once_per_stall_period() -> None:
    beat = Heartbeat(total=100, every_s=10, stall_s=25, now=0.0)
    counts = Counts()
    assert beat.lines(5.0, counts, in_flight=4) == []
    counts.done, counts.failed, counts.tokens = 18, 2, 640
    (line,) = beat.lines(10.0, counts, in_flight=4)
    assert line == (
        "meshllm: 20/100 rows finished (18 done, 2 failed), 4 in flight, 640 tokens, "
        "2.0 rows/s, 64 tokens/s, ETA 40s"
    )
    assert beat.lines(12.0, counts, in_flight=4) == []
    assert len(beat.lines(20.0, counts, in_flight=4)) == 1  # a status line, no warning yet
    lines = beat.lines(35.0, counts, in_flight=4)  # nothing finished since t=10
    assert lines[-1] == "meshllm: warning: no row finished in the last 25s (4 in flight)"
    assert not any("warning" in x for x in beat.lines(45.0, counts, in_flight=4))
    assert any("last 50s" in x for x in beat.lines(60.0, counts, in_flight=4))  # again
    counts.done += 1
    assert not any("warning" in x for x in beat.lines(70.0, counts, in_flight=3))


def test_heartbeat_off_prints_nothing_and_durations_read_well() -> None:
    beat = Heartbeat(total=None, every_s=0, stall_s=0, now=0.0)
    assert beat.lines(1e6, Counts(), in_flight=1) == []
    assert "ETA" not in beat.status(10.0, Counts(done=5), in_flight=0)
    assert [duration(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]


def status(name: str, state: ReplicaState, error: str = "") -> ReplicaStatus:
    return ReplicaStatus(replica_id=name, state=state, error=error)


def test_up_gives_up_once_every_placed_load_failed_and_says_why() -> None:
    failed = [status("r0", ReplicaState.FAILED, "no such folder")]
    assert load_failures(failed, placed=2) is None  # the second may still load
    both = [*failed, status("r1", ReplicaState.FAILED, "no such folder")]
    assert load_failures(both, placed=2) == ("every replica's load failed: no such folder (r0, r1)")
    assert load_failures([status("r0", ReplicaState.LOADING)], placed=1) is None
    assert load_failures([], placed=0) is None
