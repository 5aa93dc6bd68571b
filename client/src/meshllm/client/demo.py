"""The main job (``make demo``, ``meshllm demo``): a local mesh on the built-in real model
SmolLM2-135M-Instruct — two replica processes and a router — then a streamed chat reply and a
small batch of questions through the router, and who served them.
"""

from __future__ import annotations

import time
from collections import Counter

from meshllm.client import BatchOptions, Client
from meshllm.client.local import LocalMesh, LocalMeshConfig

MODEL = "smollm2"
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What do bees make?",
    "How many days are in a week?",
    "What is the opposite of hot?",
    "Which planet do we live on?",
    "What colour is the sky on a clear day?",
    "What is two plus two?",
]


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def main(replicas: int = 2) -> None:
    print(f"$ meshllm up --replicas {replicas} --model {MODEL}", flush=True)
    with LocalMesh(LocalMeshConfig(replicas=replicas, port=0, model=MODEL)) as mesh:
        print(f"router at {mesh.address}, replicas at {', '.join(a for a, _ in mesh.replicas)}")
        with Client(mesh.address, timeout=120.0) as client:
            print(f"models: {[(m.id, m.ready_replicas) for m in client.list_models()]}\n")
            question = "Write a short poem about the sea."
            print(f"user> {question}\nassistant> ", end="", flush=True)
            for chunk in client.stream(chat(question), model=MODEL, max_tokens=80):
                print(chunk.text, end="", flush=True)
                if chunk.finish_reason is not None and chunk.usage and chunk.timing:
                    print(
                        f"\n[{chunk.finish_reason.value}; {chunk.usage.completion_tokens} tokens, "
                        f"served by {chunk.timing.replica}]\n"
                    )
            started = time.perf_counter()
            items = client.generate_batch(
                [chat(q) for q in QUESTIONS],
                model=MODEL,
                max_tokens=40,
                options=BatchOptions(concurrency=8),
            )
            elapsed = time.perf_counter() - started
        ok = [i.result for i in items if i.result is not None]
        tokens = sum(c.usage.completion_tokens for c in ok)
        print(
            f"batch: {len(ok)}/{len(items)} done in {elapsed:.2f}s, {tokens / elapsed:.0f} tokens/s"
        )
        for item in items:
            answer = item.result.text.strip() if item.result else f"error: {item.error}"
            print(f"  [{item.index}] {QUESTIONS[item.index]} -> {answer[:100]!r}")
        print(f"served by: {dict(sorted(Counter(c.replica for c in ok).items()))}")
        print("stopping the mesh (router first, then replicas) ...", flush=True)
    print("done.")


if __name__ == "__main__":
    main()
