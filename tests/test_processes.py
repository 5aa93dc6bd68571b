"""End-to-end with real processes: the meshllm-replica command, grpcurl, SIGTERM drain."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc

StartProcess = Callable[..., tuple[subprocess.Popen[bytes], int]]
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


def test_sigterm_drains_in_flight_streams_then_exits(replica_process: StartProcess) -> None:
    proc, port = replica_process("--model", "demo", "--drain-grace", "30")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = gen_grpc.GenerationStub(channel)
        call = client.GenerateStream(gen.GenerateRequest(model="demo", prompt="drain me", max_tokens=1800,
                                                         temperature=0.0))  # fmt: skip
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
