"""End-to-end with real processes: meshllm-replica, meshllm-router, meshllm up, grpcurl,
SIGTERM drains and a replica killed under load."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
from conftest import StartProcess

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client import Client, Unauthenticated
from meshllm.client.local import LocalMesh, LocalMeshConfig, free_port
from meshllm.router.tenants import hash_key

GRPCURL = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))


def grpcurl(*args: str) -> str:
    assert GRPCURL is not None
    out = subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (it comes with `make setup`)")
def test_grpcurl_lists_services_checks_health_and_streams(replica_process: StartProcess) -> None:
    _, port = replica_process("--model", "demo")
    target = f"127.0.0.1:{port}"
    services = grpcurl(target, "list").split()
    assert {
        "meshllm.api.v1.Generation",
        "meshllm.api.v1.ReplicaControl",
        "grpc.health.v1.Health",
    } <= set(services)
    assert json.loads(grpcurl(target, "grpc.health.v1.Health/Check")) == {"status": "SERVING"}
    request = json.dumps({"model": "demo", "prompt": "Hello", "max_tokens": 12, "temperature": 0})
    out = grpcurl("-d", request, target, "meshllm.api.v1.Generation/GenerateStream")
    chunks = [json.loads(part) for part in out.replace("}\n{", "}\x00{").split("\x00")]
    assert sum(len(c.get("token_ids", [])) for c in chunks) == 12
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert chunks[-1]["usage"]["completion_tokens"] == 12


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl not installed (it comes with `make setup`)")
def test_grpcurl_chat_with_the_real_model_reads_as_english_and_stops(
    replica_process: StartProcess, smollm2_dir: Path
) -> None:
    _, port = replica_process("--model", "smollm2")
    request = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 64,
    }
    out = json.loads(
        grpcurl(
            "-d", json.dumps(request), f"127.0.0.1:{port}", "meshllm.api.v1.Generation/Generate"
        )
    )
    assert out["finish_reason"] == "FINISH_REASON_STOP", out
    assert "Paris" in out["text"] and "<|im_end|>" not in out["text"], out


def test_meshllm_demo_streams_english_and_answers_the_batch(smollm2_dir: Path) -> None:
    """The README's main job (``make demo`` runs ``meshllm demo``)."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "meshllm"), "demo"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "models: [('smollm2', 2)]" in out, out
    assert "batch: 8/8 done" in out and "error:" not in out, out
    answers = dict(line.split(" -> ", 1) for line in out.splitlines() if " -> " in line)
    assert len(answers) == 8
    assert "Paris" in answers["  [0] What is the capital of France?"], out
    assert "served by: {'replica-0': " in out and "'replica-1': " in out, out


def test_sigterm_drains_in_flight_streams_then_exits(replica_process: StartProcess) -> None:
    proc, port = replica_process("--model", "demo", "--drain-grace", "30")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = gen_grpc.GenerationStub(channel)
        call = client.GenerateStream(
            gen.GenerateRequest(model="demo", prompt="drain me", max_tokens=1800, temperature=0.0)
        )
        first = next(call)
        chunks = [first]
        reader = threading.Thread(target=lambda: chunks.extend(call))
        reader.start()
        proc.send_signal(signal.SIGTERM)
        reader.join(timeout=60)
        with pytest.raises(grpc.RpcError):  # draining: new work is refused, then the port closes
            client.Generate(
                gen.GenerateRequest(model="demo", prompt="late", max_tokens=4), timeout=5
            )
    assert proc.wait(timeout=60) == 0
    assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 1800


def long_stream(
    client: gen_grpc.GenerationStub, i: int, max_tokens: int, started: threading.Event
) -> Outcome:
    """One stream to the end: the chunks received and the error that ended it, if any;
    ``started`` is set at the first chunk."""
    chunks: list[gen.GenerateChunk] = []
    try:
        for chunk in client.GenerateStream(
            gen.GenerateRequest(
                model="bench",
                prompt=f"request {i}",
                max_tokens=max_tokens,
                temperature=0.0,
                stream_options=gen.StreamOptions(coalesce_ms=5),
            ),
            timeout=120,
        ):
            chunks.append(chunk)
            started.set()
        return Outcome(chunks, None)
    except grpc.RpcError as e:
        return Outcome(chunks, e)


@dataclass
class Outcome:
    chunks: list[gen.GenerateChunk]
    error: grpc.RpcError | None

    @property
    def complete(self) -> bool:
        return self.error is None and self.chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH


def test_sigkill_of_a_replica_under_load_loses_no_request_that_had_not_started(
    replica_process: StartProcess, router_process: StartProcess
) -> None:
    # One request at a time per replica, so each replica has one stream running and the rest
    # queued (not started) when the victim is killed.
    serial = (
        "--model",
        "bench",
        "--max-batch-size",
        "1",
        "--inter-threads",
        "1",
        "--intra-threads",
        "1",
    )
    victim, victim_port = replica_process(*serial, "--replica-id", "victim")
    _, survivor_port = replica_process(*serial, "--replica-id", "survivor")
    _, port = router_process(
        "--replica", f"127.0.0.1:{victim_port}", "--replica", f"127.0.0.1:{survivor_port}"
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, ThreadPoolExecutor(12) as pool:
        client = gen_grpc.GenerationStub(channel)
        started = [threading.Event() for _ in range(12)]
        futures = [pool.submit(long_stream, client, i, 600, started[i]) for i in range(12)]
        deadline = time.monotonic() + 60
        while sum(e.is_set() for e in started) < 2:  # both replicas are streaming one each
            assert time.monotonic() < deadline, "streams did not start"
            time.sleep(0.002)
        victim.kill()
        busy_at_kill = sum(e.is_set() for e in started)
        outcomes = [f.result(timeout=120) for f in futures]
    interrupted = [o for o in outcomes if not o.complete]
    for o in interrupted:  # started on the victim: ended with UNAVAILABLE, never looking complete
        assert o.error is not None and o.error.code() == grpc.StatusCode.UNAVAILABLE, o.error
        assert o.chunks and o.chunks[-1].finish_reason == gen.FINISH_REASON_UNSPECIFIED
        assert "incomplete" in (o.error.details() or "")
    served = Counter(o.chunks[-1].timing.replica for o in outcomes if o.complete)
    print(
        f"complete by replica: {dict(served)}; interrupted: {len(interrupted)}; started at the kill: {busy_at_kill}"
    )
    # Only the stream running on the victim may fail; everything queued there moved on.
    assert len(interrupted) == 1
    assert served["survivor"] >= 11 - served["victim"]
    assert all(sum(len(c.token_ids) for c in o.chunks) == 600 for o in outcomes if o.complete)


def test_router_sigterm_lets_in_flight_streams_finish(
    replica_process: StartProcess, router_process: StartProcess
) -> None:
    _, replica_port = replica_process(
        "--model", "demo", "--engine", "fake", "--option", "token_delay_ms=5"
    )
    router, port = router_process("--replica", f"127.0.0.1:{replica_port}", "--drain-grace", "30")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = gen_grpc.GenerationStub(channel)
        call = client.GenerateStream(gen.GenerateRequest(model="demo", prompt="x", max_tokens=200))
        chunks = [next(call)]
        router.send_signal(signal.SIGTERM)
        chunks.extend(call)  # about a second more of tokens
        with pytest.raises(grpc.RpcError):
            client.Generate(
                gen.GenerateRequest(model="demo", prompt="late", max_tokens=4), timeout=5
            )
    assert router.wait(timeout=30) == 0
    assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 200


def test_meshllm_up_starts_a_mesh_and_stops_it_all_on_ctrl_c(model_cache: Path) -> None:
    port, http_port = free_port(), free_port()
    up = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "meshllm"),
            "up",
            "--model",
            "demo",
            "--replicas",
            "2",
            "--port",
            str(port),
            "--http-port",
            str(http_port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert up.stdout is not None
        lines = []
        while "meshllm is up" not in (line := up.stdout.readline()):
            assert line, "meshllm up exited before the mesh was up"
        lines.append(line)
        while "Ctrl-C stops the mesh" not in (line := up.stdout.readline()):
            lines.append(line)  # the addresses and commands to try
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(psutil.Process(up.pid).children()) == 3  # a router and two replicas
        assert len(engine_processes(children)) == 2  # each replica's engine, in its own process
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = gen_grpc.GenerationStub(channel)
            (info,) = client.ListModels(gen.ListModelsRequest(), timeout=5).models
            replies = [
                client.Generate(
                    gen.GenerateRequest(model="demo", prompt=f"hi {i}", max_tokens=4), timeout=30
                )
                for i in range(8)
            ]
        assert info.ready_replicas == 2
        assert {r.timing.replica for r in replies} == {"replica-0", "replica-1"}
        chat = _post_json(
            f"http://127.0.0.1:{http_port}/v1/chat/completions",
            {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
        assert chat["choices"][0]["finish_reason"] == "length"
        assert chat["usage"]["completion_tokens"] == 3
        up.send_signal(signal.SIGINT)
        lines.append(up.communicate(timeout=60)[0])
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0
    out = "".join(lines)
    assert f"router at 127.0.0.1:{port}" in out and out.endswith("stopped.\n")
    assert f"OpenAI-compatible API at http://127.0.0.1:{http_port}/v1" in out
    assert not any(
        child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children
    )


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = httpx.post(url, json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    return data


def engine_processes(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if "meshllm.replica.engines.worker" in " ".join(p.cmdline())]


def test_killing_meshllm_up_itself_stops_its_children(model_cache: Path) -> None:
    up = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "meshllm"),
            "up",
            "--model",
            "demo",
            "--replicas",
            "1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert up.stdout is not None
        while "meshllm is up" not in (line := up.stdout.readline()):
            assert line, "meshllm up exited before the mesh was up"
        children = psutil.Process(up.pid).children(recursive=True)
        assert (len(children), len(engine_processes(children))) == (3, 1)
        up.kill()  # no chance to clean up: the children must notice on their own
        up.wait()
        _, alive = psutil.wait_procs(children, timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
    assert alive == []


def test_a_local_mesh_with_a_tenants_file_needs_keys(model_cache: Path, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[[tenants]]\nname = "dev"\nkeys = ["{hash_key("dev-key")}"]\n')
    with pytest.raises(ValueError, match="api_key"):
        LocalMeshConfig(tenants_file=str(tenants)).validate()
    config = LocalMeshConfig(
        replicas=1, port=0, model="demo", tenants_file=str(tenants), api_key="dev-key"
    )
    with (
        LocalMesh(config) as mesh,
        Client(mesh.address, timeout=30) as anonymous,
        Client(mesh.address, api_key="dev-key", timeout=30) as keyed,
    ):
        with pytest.raises(Unauthenticated):
            anonymous.generate("hi", model="demo", max_tokens=2)
        assert keyed.generate("hi", model="demo", max_tokens=2).usage.completion_tokens == 2


def test_streams_the_client_got_whole_are_ok_in_the_replicas_log_too(
    replica_process: StartProcess, router_process: StartProcess, capfd: pytest.CaptureFixture[str]
) -> None:
    """The router waits for the replica's status after the final chunk: cancelling the call at
    once raced it, and the replica logged (and counted, and traced) about one complete stream
    in fifteen as CANCELLED while the client and the router saw OK."""
    _, replica_port = replica_process("--model", "demo")
    _, port = router_process("--replica", f"127.0.0.1:{replica_port}")
    ids = [f"whole{i}" for i in range(150)]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = gen_grpc.GenerationStub(channel)
        for rid in ids:
            request = gen.GenerateRequest(
                model="demo", prompt="Hello", max_tokens=24, temperature=0.0, request_id=rid
            )
            chunks = list(client.GenerateStream(request, timeout=30))
            assert chunks[-1].finish_reason != gen.FINISH_REASON_UNSPECIFIED
    time.sleep(0.5)  # the replica writes its last lines
    codes: dict[str, list[str]] = {}
    for rid, code in re.findall(r"request_id=(whole\d+)\b.*?\bcode=(\w+)", capfd.readouterr().err):
        codes.setdefault(rid, []).append(code)
    bad = {rid: c for rid, c in codes.items() if c != ["OK", "OK"]}  # the replica's, the router's
    assert sorted(codes) == sorted(ids) and not bad, bad


def test_a_hung_replica_fails_over_its_queued_work_at_ejection_and_ends_its_streams(
    replica_process: StartProcess, router_process: StartProcess
) -> None:
    """SIGSTOP, not SIGKILL: the connection stays open and nothing answers. The router ejects
    the replica for its missing load reports (2 s); its queued requests then move to the other
    replica at once and its running stream ends UNAVAILABLE soon after (they once waited
    60-70 s for TCP to give up)."""
    serial = ["--model", "demo", "--engine", "fake", "--option", "token_delay_ms=10"]
    serial += ["--max-batch-size", "1", "--inter-threads", "1"]
    victim, victim_port = replica_process(*serial, "--replica-id", "victim")
    _, survivor_port = replica_process(*serial, "--replica-id", "survivor")
    _, port = router_process(
        "--replica", f"127.0.0.1:{victim_port}", "--replica", f"127.0.0.1:{survivor_port}"
    )
    ended: dict[int, float] = {}

    def timed(client: gen_grpc.GenerationStub, i: int, started: threading.Event) -> Outcome:
        request = gen.GenerateRequest(model="demo", prompt=f"request {i}", max_tokens=100)
        chunks: list[gen.GenerateChunk] = []
        try:
            for chunk in client.GenerateStream(request, timeout=120):
                chunks.append(chunk)
                started.set()
            return Outcome(chunks, None)
        except grpc.RpcError as e:
            return Outcome(chunks, e)
        finally:
            ended[i] = time.monotonic()

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, ThreadPoolExecutor(8) as pool:
        client = gen_grpc.GenerationStub(channel)
        started = [threading.Event() for _ in range(8)]
        futures = [pool.submit(timed, client, i, started[i]) for i in range(8)]
        deadline = time.monotonic() + 60
        while sum(e.is_set() for e in started) < 2:  # both replicas are streaming one each
            assert time.monotonic() < deadline, "streams did not start"
            time.sleep(0.002)
        victim.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            outcomes = [f.result(timeout=120) for f in futures]
        finally:
            victim.send_signal(signal.SIGCONT)
    after = {i: round(t - stopped_at, 1) for i, t in ended.items()}
    interrupted = [i for i, o in enumerate(outcomes) if not o.complete]
    print(f"seconds after the SIGSTOP each stream ended: {after}; interrupted: {interrupted}")
    assert len(interrupted) == 1  # the one running there; the queued ones moved on
    (cut,) = (outcomes[i] for i in interrupted)
    assert cut.error is not None and cut.error.code() == grpc.StatusCode.UNAVAILABLE
    assert "incomplete" in (cut.error.details() or "")
    # ejection after 2 s of silence, then 2 s more without a chunk: well before TCP's minute
    assert after[interrupted[0]] < 8, after
    # the survivor served the other seven one after another, 1 s each
    assert max(after.values()) < 20, after
    assert all(sum(len(c.token_ids) for c in o.chunks) == 100 for o in outcomes if o.complete)
