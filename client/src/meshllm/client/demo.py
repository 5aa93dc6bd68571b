"""The main job (``make demo``, ``meshllm demo``): a local mesh on the built-in demo model — two replica processes
and a router — then a streamed reply and a small batch through the router, and who served them.
"""

from __future__ import annotations

import time
from collections import Counter

from meshllm.client import BatchOptions, Client
from meshllm.client.local import LocalMesh, LocalMeshConfig

PROMPTS = [f"Tell me about the number {i}." for i in range(16)]


def main(replicas: int = 2) -> None:
    print(f"$ meshllm up --replicas {replicas} --model demo", flush=True)
    with LocalMesh(LocalMeshConfig(replicas=replicas, port=0)) as mesh:
        print(f"router at {mesh.address}, replicas at {', '.join(a for a, _ in mesh.replicas)}")
        with Client(mesh.address, timeout=60.0) as client:
            print(f"models: {[(m.id, m.ready_replicas) for m in client.list_models()]}\n")
            print("stream> ", end="", flush=True)
            for chunk in client.stream("Once upon a time", model="demo", max_tokens=48):
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason is not None and chunk.usage and chunk.timing:
                    print(
                        f"\n[{chunk.finish_reason.value}; {chunk.usage.completion_tokens} tokens, "
                        f"served by {chunk.timing.replica}]\n"
                    )
            started = time.perf_counter()
            items = client.generate_batch(
                PROMPTS, model="demo", max_tokens=32, options=BatchOptions(concurrency=8)
            )
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
        print(f"served by: {dict(sorted(Counter(c.replica for c in ok).items()))}")
        print("stopping the mesh (router first, then replicas) ...", flush=True)
    print("done.")


if __name__ == "__main__":
    main()
