"""The main job (``make demo``): a local replica on the built-in demo model, a streamed reply,
and a small batch, all through the public gRPC API.

It starts ``meshllm-replica --model demo`` as a child process on a free port, waits for it to be
healthy, streams one reply to the terminal, runs a batch of prompts, prints who served them and
how fast, then stops the replica (SIGTERM: it drains and exits).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

from meshllm.client import Client, MeshError

PROMPTS = [f"Tell me about the number {i}." for i in range(16)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(
    client: Client, replica: subprocess.Popen[bytes], deadline_s: float = 120.0
) -> None:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if replica.poll() is not None:
            sys.exit(f"replica exited with code {replica.returncode}")
        try:
            if client.list_models(timeout=2.0):
                return
        except MeshError:
            pass
        time.sleep(0.2)
    sys.exit("replica did not become ready in time")


def main() -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "meshllm.replica", "--host", "127.0.0.1", "--port", str(port),
           "--model", "demo", "--log-level", "WARNING"]  # fmt: skip
    print(f"$ meshllm-replica --port {port} --model demo", flush=True)
    replica = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with Client(f"127.0.0.1:{port}", timeout=60.0) as client:
            _wait_ready(client, replica)
            print(f"models: {[m.id for m in client.list_models()]}\n")
            print("stream> ", end="", flush=True)
            for chunk in client.stream("Once upon a time", model="demo", max_tokens=48):
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason is not None:
                    print(f"\n[{chunk.finish_reason.value}; {chunk.usage.completion_tokens if chunk.usage else 0} tokens, "
                          f"served by {chunk.timing.replica if chunk.timing else '?'}]\n")  # fmt: skip
            started = time.perf_counter()
            items = client.generate_batch(PROMPTS, model="demo", max_tokens=32, concurrency=8)
            elapsed = time.perf_counter() - started
            ok = [i.result for i in items if i.result is not None]
            tokens = sum(c.usage.completion_tokens for c in ok)
            print(
                f"batch: {len(ok)}/{len(items)} done in {elapsed:.2f}s, {tokens / elapsed:.0f} tokens/s"
            )
            for item in items[:3]:
                print(
                    f"  [{item.index}] {item.result.text[:60]!r}"
                    if item.result
                    else f"  [{item.index}] {item.error}"
                )
            print(f"served by: {dict(Counter(c.replica for c in ok))}")
    finally:
        replica.send_signal(signal.SIGTERM)
        replica.wait(timeout=30)


if __name__ == "__main__":
    main()
