"""The client end to end with real processes: a large batch through a router with a tight
quota while a replica is SIGKILLed, the JSONL CLI SIGKILLed and resumed, and ``meshllm bench``."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import StartProcess

from meshllm.api import errors
from meshllm.client import BatchOptions, Client, MeshError, RetryPolicy

MESHLLM = str(Path(sys.executable).parent / "meshllm")
KEY = "batch-test-key"


def tenants_file(path: Path, **limits: int) -> Path:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    body = "".join(f"{name} = {value}\n" for name, value in limits.items())
    path.write_text(
        f'[[tenants]]\nname = "batch"\nrole = "user"\nkeys = ["sha256:{digest}"]\n{body}'
    )
    return path


def wait_listed(target: str, api_key: str | None = None, replicas: int = 1) -> None:
    deadline = time.monotonic() + 60
    with Client(target, api_key=api_key, timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                if sum(m.ready_replicas for m in client.list_models()) >= replicas:
                    return
            except MeshError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{target} lists no model")


@pytest.mark.slow
def test_5000_item_batch_with_a_replica_killed_and_a_tight_quota_ends_in_order(
    replica_process: StartProcess, processes: StartProcess, tmp_path: Path
) -> None:
    victim, victim_port = replica_process("--model", "demo", "--replica-id", "victim")
    _, survivor_port = replica_process("--model", "demo", "--replica-id", "survivor")
    # 4200 requests a minute: the bucket holds 4200 and refills 70 a second, so 5000 items
    # cannot finish in less than (5000 - 4200) / 70 = 11.4 s, however fast the mesh is.
    tenants = tenants_file(
        tmp_path / "tenants.toml",
        requests_per_minute=4200,
        concurrent_requests=12,
        tokens_per_minute=2_000_000,
    )
    _, port = processes(
        "meshllm.router",
        "--report-interval-ms",
        "50",
        "--tenants-file",
        str(tenants),
        "--replica",
        f"127.0.0.1:{victim_port}",
        "--replica",
        f"127.0.0.1:{survivor_port}",
        wait=False,
    )
    target = f"127.0.0.1:{port}"
    wait_listed(target, KEY, replicas=2)
    finished = 0

    def on_result(index: int, result: object, error: MeshError | None) -> None:
        nonlocal finished
        finished += 1
        if finished == 1500:
            victim.send_signal(signal.SIGKILL)

    started = time.monotonic()
    with Client(target, api_key=KEY, timeout=30) as client:
        options = BatchOptions(
            concurrency=12, on_result=on_result, retry=RetryPolicy(max_attempts=10)
        )
        items = client.generate_batch(
            (f"item {i}" for i in range(5000)),
            model="demo",
            max_tokens=2,
            temperature=0.0,
            options=options,
        )
    elapsed = time.monotonic() - started
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert [item.index for item in items] == list(range(5000))
    assert all((item.result is None) != (item.error is None) for item in items)
    failed = [item for item in items if item.error is not None]
    served = Counter(item.result.replica for item in items if item.result is not None)
    retried = sum(item.attempts - 1 for item in items if item.attempts > 1)
    codes = Counter(item.error.code.name for item in failed if item.error)
    print(f"{elapsed:.1f}s; served by {dict(served)}; {retried} retries; failed: {dict(codes)}")
    assert all(isinstance(i.error, errors.Unavailable | errors.ResourceExhausted) for i in failed)
    assert len(failed) <= 50  # retries carry nearly all of them through
    assert served["victim"] >= 100 and served["survivor"] >= 2500  # the kill came midway
    assert elapsed >= 11.0  # the quota was enforced: it could not go faster
    assert retried <= 250  # paced from the x-ratelimit-* metadata: few refusals, if any


BROKEN, TOO_LONG = (20, 2990), (30, 2995)  # before the kill and after it


def write_input(path: Path, rows: int) -> list[int]:
    """``rows`` lines with an ``id`` to pass through; a blank line, a broken line and a row
    that asks too much among them. Returns the indexes that must have an output row."""
    lines, expected = [], []
    for i in range(rows):
        if i == 10:
            lines.append("")
            continue
        if i in BROKEN:
            lines.append('{"prompt": "broken"')
        elif i in TOO_LONG:
            lines.append(
                json.dumps({"id": f"row-{i}", "prompt": "too long", "max_tokens": 100_000})
            )
        else:
            lines.append(json.dumps({"id": f"row-{i}", "prompt": f"row {i}"}))
        expected.append(i)
    path.write_text("\n".join(lines) + "\n")
    return expected


def run_cli(target: str, src: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            MESHLLM,
            "--target",
            target,
            "generate",
            "--input",
            str(src),
            "--output",
            str(out),
            "--model",
            "demo",
            "--max-tokens",
            "3",
            "--concurrency",
            "8",
            "--no-progress",
            *extra,
        ],
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_cli_killed_mid_run_resumes_with_exactly_one_row_per_input(
    replica_process: StartProcess, tmp_path: Path
) -> None:
    _, port = replica_process("--model", "demo")
    target, src, out = f"127.0.0.1:{port}", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    expected = write_input(src, 3000)
    first = run_cli(target, src, out)
    deadline = time.monotonic() + 120
    while not out.exists() or out.read_bytes().count(b"\n") < 600:
        assert first.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    written = out.read_bytes().count(b"\n")
    assert written < len(expected)
    with out.open("ab") as f:  # as if the kill had cut a write short
        f.write(b'{"index": 2999, "id": "row-2999", "te')
    second = run_cli(target, src, out, "--resume")
    _, stderr = second.communicate(timeout=180)
    assert second.returncode == 1, stderr  # 1: some rows carry errors (broken, too long)
    assert f"{written} already done".encode() in stderr
    rows = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert sorted(r["index"] for r in rows) == expected  # each exactly once
    by_index = {r["index"]: r for r in rows}
    for i in BROKEN + TOO_LONG:
        assert by_index[i]["error"]["code"] == "INVALID_ARGUMENT"
    assert by_index[2995]["id"] == "row-2995"  # passed through on error rows too
    assert all(
        r["id"] == f"row-{i}" and r["error"] is None and r["usage"]["completion_tokens"] <= 3
        for i, r in by_index.items()
        if i not in BROKEN + TOO_LONG
    )
    before = out.read_bytes()
    third = run_cli(target, src, out, "--resume")
    _, stderr = third.communicate(timeout=60)
    assert out.read_bytes() == before and b"0 rows done" in stderr  # nothing left to do


def test_cli_refuses_to_overwrite_output_without_resume(tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(src, 3)
    out.write_text('{"index": 0}\n')
    done = subprocess.run(
        [MESHLLM, "generate", "--input", str(src), "--output", str(out), "--model", "demo"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--resume" in done.stderr
    assert out.read_text() == '{"index": 0}\n'


@pytest.mark.slow
def test_bench_sweeps_concurrency_and_recommends_a_level(replica_process: StartProcess) -> None:
    _, port = replica_process("--model", "demo")
    done = subprocess.run(
        [
            MESHLLM,
            "--target",
            f"127.0.0.1:{port}",
            "bench",
            "--model",
            "demo",
            "--levels",
            "1,4",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--max-tokens",
            "8",
            "--json",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 4]
    for lv in report["levels"]:
        assert lv["errors"] == 0 and lv["requests"] > 0
        assert lv["tokens_per_s"] == pytest.approx(lv["requests_per_s"] * 8, rel=0.05)
        assert 0 < lv["ttft_ms"]["p50"] <= lv["latency_ms"]["p50"] <= lv["latency_ms"]["p99"]
    assert report["recommended_concurrency"] in (1, 4)


def test_cli_cache_answers_a_second_run_and_refresh_asks_again(
    replica_process: StartProcess, tmp_path: Path
) -> None:
    _, port = replica_process("--model", "demo")
    target, src, cache = f"127.0.0.1:{port}", tmp_path / "in.jsonl", tmp_path / "cache.sqlite"
    src.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(20)))

    def run(name: str, *extra: str) -> list[dict[str, object]]:
        out = tmp_path / name
        proc = run_cli(target, src, out, "--temperature", "0", "--cache", str(cache), *extra)
        assert proc.wait(timeout=60) == 0
        return sorted(
            (json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"]
        )

    first, second, refreshed = run("1.jsonl"), run("2.jsonl"), run("3.jsonl", "--refresh-cache")
    assert not any(r["cached"] for r in first) and all(r["cached"] for r in second)
    assert not any(r["cached"] for r in refreshed)
    assert (
        [r["text"] for r in second] == [r["text"] for r in first] == [r["text"] for r in refreshed]
    )
