"""The console scripts as a user meets them, run as real processes (``.venv/bin/meshllm``,
``meshllm-router``, ``meshllm-replica``): usage errors, versions, keys from the environment or
a file, and the batch features that only show from outside (order, resume, heartbeat)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import StartProcess

from meshllm.client import AsyncClient

BIN = Path(sys.executable).parent
MESHLLM, ROUTER, REPLICA = (
    str(BIN / name) for name in ("meshllm", "meshllm-router", "meshllm-replica")
)
CHART = str(Path(__file__).parents[2] / "helm" / "chart.py")
KEY = "cli-test-key"


def run(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n')
    return path


def clear_text_tenants(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text('[[tenants]]\nname = "t"\nrole = "user"\nkeys = ["my-secret-key"]\n')
    return path


USAGE_ERRORS = {
    "max-tokens": (["generate", "Hello", "--model", "demo", "--max-tokens", "-5"], "--max-tokens"),
    "seed": (["generate", "Hello", "--model", "demo", "--seed", "-1"], "--seed"),
    "top-k": (["generate", "Hello", "--model", "demo", "--top-k", "-1"], "--top-k"),
    "top-p": (["generate", "Hello", "--model", "demo", "--top-p", "0"], "--top-p"),
    "repetition-penalty": (
        ["generate", "Hello", "--model", "demo", "--repetition-penalty", "0"],
        "--repetition-penalty",
    ),
    "scale": (["admin", "scale", "demo", "-1"], "replicas"),
    "input": (["generate", "--input", "nosuch.jsonl", "--model", "demo"], "nosuch.jsonl"),
    "concurrency": (
        ["generate", "--input", "{rows}", "--model", "demo", "--concurrency", "0"],
        "--concurrency",
    ),
    "abort-ratio": (
        ["generate", "--input", "{rows}", "--model", "demo", "--abort-ratio", "2"],
        "--abort-ratio",
    ),
    "levels-0": (["bench", "--model", "demo", "--levels", "0"], "--levels"),
    "levels-abc": (["bench", "--model", "demo", "--levels", "abc"], "--levels"),
    "duration": (["bench", "--model", "demo", "--duration", "0"], "--duration"),
    "key-file": (["--api-key-file", "nosuch-key", "models"], "--api-key-file"),
    "key-and-file": (["models", "--api-key", "k", "--api-key-file", "f"], "not allowed with"),
    "timeout": (["--timeout", "0", "models"], "--timeout"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_bad_values_are_one_line_on_stderr_and_exit_status_2(case: str, rows: Path) -> None:
    argv, named = USAGE_ERRORS[case]
    done = run(MESHLLM, *(a.replace("{rows}", str(rows)) for a in argv))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert named in done.stderr and done.stdout == ""


@pytest.mark.parametrize("tenants", ["clear-text", "missing"])
def test_a_bad_tenants_file_stops_the_router_with_one_line(tenants: str, tmp_path: Path) -> None:
    path = clear_text_tenants(tmp_path) if tenants == "clear-text" else tmp_path / "nosuch.toml"
    done = run(ROUTER, "--port", "0", "--replica", "127.0.0.1:1", "--tenants-file", str(path))
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and last.startswith("meshllm-router: ")
    assert str(path) in last and "my-secret-key" not in done.stderr
    assert ("never the key" if tenants == "clear-text" else "No such file") in last


def test_new_key_help_prints_help_and_creates_no_key() -> None:
    for flag in ("--help", "-h"):
        done = run(ROUTER, "new-key", flag)
        assert done.returncode == 0 and done.stdout.startswith("usage: meshllm-router new-key")
        assert "[[tenants]]" not in done.stdout and "API key" not in done.stderr
    done = run(ROUTER, "new-key", "--oops")
    assert done.returncode == 2 and "[[tenants]]" not in done.stdout
    made = run(ROUTER, "new-key", "research", "admin")
    assert made.returncode == 0 and 'name = "research"' in made.stdout
    key = made.stderr.strip().rsplit(" ", 1)[-1]
    assert key.startswith("mk-") and key not in made.stdout


def test_every_command_has_a_version() -> None:
    for script, name in (
        (MESHLLM, "meshllm"),
        (ROUTER, "meshllm-router"),
        (REPLICA, "meshllm-replica"),
    ):
        done = run(script, "--version")
        assert done.returncode == 0, done.stderr
        shown, version = done.stdout.split()
        assert shown == name and version.count(".") >= 2 and version[0].isdigit()


def test_chart_tool_leaves_quietly_when_its_reader_does() -> None:
    for argv in (
        ["template", "meshllm", "helm/meshllm"],
        ["install", "meshllm", "helm/meshllm", "-n", "meshllm", "--dry-run"],
    ):
        proc = subprocess.Popen(
            [sys.executable, CHART, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(CHART).parents[1],
        )
        assert proc.stdout is not None
        proc.stdout.close()  # as `| head` does once it has its lines
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and b"Traceback" not in err and b"BrokenPipe" not in err, err


def tenants(tmp_path: Path) -> Path:
    done = run(ROUTER, "hash-key", timeout=30)  # no key on stdin: refused
    assert done.returncode == 2
    hashed = subprocess.run(
        [ROUTER, "hash-key"], input=KEY + "\n", capture_output=True, text=True, check=True
    ).stdout.strip()
    path = tmp_path / "tenants.toml"
    path.write_text(f'[[tenants]]\nname = "cli"\nrole = "admin"\nkeys = ["{hashed}"]\n')
    return path


def test_key_and_target_come_from_flags_the_environment_or_a_file(
    replica_process: StartProcess, processes: StartProcess, tmp_path: Path
) -> None:
    _, replica = replica_process("--model", "demo")
    _, port = processes(
        "meshllm.router",
        "--tenants-file",
        str(tenants(tmp_path)),
        "--replica",
        f"127.0.0.1:{replica}",
        wait=False,
    )
    target = f"127.0.0.1:{port}"
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    deadline = time.monotonic() + 60
    while (
        "demo"
        not in (
            listed := run(MESHLLM, "models", env={"MESHLLM_TARGET": target, "MESHLLM_API_KEY": KEY})
        ).stdout
    ):
        assert time.monotonic() < deadline, listed.stderr
        time.sleep(0.2)
    assert listed.returncode == 0
    # options after the subcommand, the key from a file
    after = run(MESHLLM, "models", "--target", target, "--api-key-file", str(key_file))
    assert after.returncode == 0 and after.stdout.startswith("demo\t"), after.stderr
    admin = run(MESHLLM, "admin", "models", "--target", target, "--api-key-file", str(key_file))
    assert admin.returncode == 0 and admin.stdout.startswith("demo: 1 ready"), admin.stderr
    from_file_env = run(
        MESHLLM, "--target", target, "models", env={"MESHLLM_API_KEY_FILE": str(key_file)}
    )
    assert from_file_env.returncode == 0, from_file_env.stderr
    # a flag beats the environment: a wrong key in the variable is not used
    wrong = {"MESHLLM_TARGET": "127.0.0.1:1", "MESHLLM_API_KEY": "wrong"}
    flag = run(MESHLLM, "models", "--target", target, "--api-key", KEY, env=wrong)
    assert flag.returncode == 0, flag.stderr
    quiet = subprocess.Popen(
        [MESHLLM, "models", "--target", target, "--api-key", KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert quiet.stdout is not None
    quiet.stdout.close()  # `meshllm models | head`, the reader gone before the reply
    _, err = quiet.communicate(timeout=60)
    assert quiet.returncode == 1 and b"Traceback" not in err and b"BrokenPipe" not in err, err
    refused = run(MESHLLM, "models", "--target", target, env=wrong)
    assert refused.returncode == 1 and "Unauthenticated" in refused.stderr
    assert refused.stderr.count("\n") == 1


def batch(target: str, src: Path, out: Path | None, *extra: str) -> list[str]:
    return [
        MESHLLM,
        "--target",
        target,
        "generate",
        "--input",
        str(src),
        *(["--output", str(out)] if out else []),
        "--model",
        "demo",
        "--max-tokens",
        "2",
        "--no-progress",
        *extra,
    ]


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ordered_output_keeps_refused_rows_in_their_place(
    replica_process: StartProcess, tmp_path: Path
) -> None:
    _, port = replica_process("--model", "demo")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = {1, 4, 5, 17, 39}
    src.write_text(
        "".join(
            ("{broken\n" if i % 2 else '{"id": 1}\n')
            if i in bad
            else json.dumps({"prompt": f"row {i}"}) + "\n"
            for i in range(40)
        )
    )
    done = run(*batch(f"127.0.0.1:{port}", src, out, "--ordered", "--concurrency", "8"))
    assert done.returncode == 1, done.stderr  # 1: the refused rows are errors
    got = read_rows(out)
    assert [r["index"] for r in got] == list(range(40))
    assert {r["index"] for r in got if r["error"]} == bad
    assert all(r["error"]["code"] == "INVALID_ARGUMENT" for r in got if r["error"])


def test_ctrl_c_says_how_to_resume_and_resume_finishes_the_file(
    replica_process: StartProcess, tmp_path: Path
) -> None:
    _, port = replica_process("--model", "demo")
    target, src, out = f"127.0.0.1:{port}", tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"row {i}"}) + "\n" for i in range(3000)))
    proc = subprocess.Popen(
        batch(target, src, out, "--concurrency", "4"), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not out.exists() or out.read_bytes().count(b"\n") < 100:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"they are in {out}" in err and "--resume" in err
    written = len(read_rows(out))
    assert f"interrupted after {written} rows" in err
    resumed = run(*batch(target, src, out, "--resume", "--concurrency", "8"), timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written} already done" in resumed.stderr
    assert sorted(r["index"] for r in read_rows(out)) == list(range(3000))


def test_resume_runs_again_the_rows_the_mesh_cancelled(
    replica_process: StartProcess, tmp_path: Path
) -> None:
    _, port = replica_process("--model", "demo")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"row {i}"}) + "\n" for i in range(4)))
    cancelled = {
        "code": "CANCELLED",
        "message": "the replica was removed",
        "reason": "REPLICA_REMOVED",
    }
    out.write_text(
        json.dumps({"index": 0, "text": "t", "finish_reason": "length", "error": None})
        + "\n"
        + json.dumps({"index": 1, "error": cancelled})
        + "\n"
        + json.dumps({"index": 2, "text": "cut", "finish_reason": "cancelled", "error": None})
        + "\n"
        + json.dumps({"index": 3, "error": {"code": "NOT_FOUND", "message": "m", "reason": ""}})
        + "\n"
    )
    done = run(*batch(f"127.0.0.1:{port}", src, out, "--resume"))
    assert done.returncode == 0 and "2 rows done, 0 failed, 2 already done" in done.stderr
    by_index = {r["index"]: r for r in read_rows(out)}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert by_index[1]["error"] is None and by_index[2]["finish_reason"] == "length"
    assert by_index[3]["error"]["code"] == "NOT_FOUND"  # final: kept


def test_heartbeat_lines_without_a_progress_bar(
    replica_process: StartProcess, tmp_path: Path
) -> None:
    _, port = replica_process("--model", "demo")
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"row {i}"}) + "\n" for i in range(400)))
    done = run(
        *batch(
            f"127.0.0.1:{port}",
            src,
            None,
            "--max-tokens",
            "16",
            "--concurrency",
            "2",
            "--heartbeat",
            "0.2",
        )
    )
    assert done.returncode == 0, done.stderr
    beats = [line for line in done.stderr.splitlines() if "rows finished" in line]
    assert beats, done.stderr
    assert all("/400 rows finished" in b and "in flight" in b and "tokens/s" in b for b in beats)
    assert len(done.stdout.splitlines()) == 400


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never says a word (a hung mesh)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_a_stalled_batch_warns_on_stderr(silent_server: int, rows: Path) -> None:
    proc = subprocess.Popen(
        batch(
            f"127.0.0.1:{silent_server}", rows, None, "--heartbeat", "0", "--stall-warning", "0.3"
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        line = proc.stderr.readline()
        assert line.startswith("meshllm: warning: no row finished in the last "), line
        assert "(1 in flight)" in line
    finally:
        proc.kill()
        proc.wait()


def test_generate_sends_chat_system_text_and_repetition_penalty(
    replica_process: StartProcess, tmp_path: Path
) -> None:
    _, port = replica_process("--model", "demo")
    target, src = f"127.0.0.1:{port}", tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "Hello there"}) + "\n")

    def prompt_tokens(*extra: str) -> int:
        done = run(*batch(target, src, None, *extra))
        assert done.returncode == 0, done.stderr
        (row,) = [json.loads(line) for line in done.stdout.splitlines()]
        return int(row["usage"]["prompt_tokens"])

    raw, chat = prompt_tokens(), prompt_tokens("--chat")
    system = prompt_tokens("--chat", "--system", "Answer in one word.")
    assert raw < chat < system  # the template wraps the message; the system text adds its own
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Hello there"},
    ]
    src.write_text(json.dumps({"messages": messages}) + "\n")  # a chat row, as JSONL allows
    assert prompt_tokens() == prompt_tokens("--chat") == system
    one = run(
        MESHLLM,
        "--target",
        target,
        "generate",
        "Hi",
        "--model",
        "demo",
        "--chat",
        "--system",
        "Be brief.",
        "--max-tokens",
        "3",
        "--repetition-penalty",
        "1.1",
    )
    assert one.returncode == 0 and one.stdout.endswith("\n"), one.stderr
    too_much = run(
        MESHLLM,
        "--target",
        target,
        "generate",
        "Hi",
        "--model",
        "demo",
        "--repetition-penalty",
        "20",
    )
    assert too_much.returncode == 1 and "repetition_penalty" in too_much.stderr  # it was sent


def test_bench_of_an_unknown_model_fails_and_says_why(replica_process: StartProcess) -> None:
    _, port = replica_process("--model", "demo")
    done = run(
        MESHLLM,
        "--target",
        f"127.0.0.1:{port}",
        "bench",
        "--model",
        "nosuch",
        "--levels",
        "1,2",
        "--duration",
        "0.5",
        "--warmup",
        "0",
    )
    assert done.returncode == 1, done.stderr
    assert "no request succeeded; stopping the sweep" in done.stderr
    assert (
        "requests failed:" in done.stderr and "NOT_FOUND" in done.stderr and "nosuch" in done.stderr
    )
    assert [line.split()[0] for line in done.stderr.splitlines() if line.startswith("c=")] == [
        "c=1"
    ]  # level 2 never ran


def test_up_with_a_model_that_cannot_load_fails_at_once_with_the_reason() -> None:
    started = time.monotonic()
    done = run(
        MESHLLM,
        "up",
        "--model",
        "nosuch-model-folder",
        "--port",
        "0",
        "--replicas",
        "2",
        timeout=200,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "every replica's load failed" in done.stderr and "nosuch-model-folder" in done.stderr
    # the ready timeout is 120 s; stopping the children after the failure takes seconds (up to
    # 30 s each if one does not exit on SIGTERM)
    assert elapsed < 100
    print(f"meshllm up --model nosuch failed after {elapsed:.1f}s")


def test_one_async_client_serves_two_asyncio_runs(replica_process: StartProcess) -> None:
    _, port = replica_process("--model", "demo")
    client = AsyncClient(f"127.0.0.1:{port}", timeout=30)

    async def one() -> str:
        return (await client.generate("hi", model="demo", max_tokens=2)).model

    assert asyncio.run(one()) == "demo"
    assert asyncio.run(one()) == "demo"  # a new loop: a new channel, not "Event loop is closed"
    asyncio.run(client.close())
