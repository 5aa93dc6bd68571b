"""``meshllm``: the command line client."""

from __future__ import annotations

import argparse
import sys

from meshllm.api.errors import MeshError
from meshllm.client._sync import Client


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="meshllm", description="meshllm command line client")
    p.add_argument("--target", default="localhost:50051", help="router or replica host:port")
    p.add_argument("--api-key", default=None)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream one reply to the terminal")
    g.add_argument("prompt")
    g.add_argument("--model", required=True)
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    sub.add_parser("models", help="list the models that can serve requests")
    sub.add_parser("demo", help="start a local replica on the demo model and exercise it")
    args = p.parse_args(argv)
    if args.command == "demo":
        from meshllm.client.demo import main as demo

        demo()
        return
    try:
        with Client(args.target, api_key=args.api_key) as client:
            if args.command == "models":
                for m in client.list_models():
                    print(
                        f"{m.id}\t{m.engine}\tcontext={m.context_length}\treplicas={m.ready_replicas}"
                    )
            else:
                for chunk in client.stream(args.prompt, model=args.model, max_tokens=args.max_tokens,
                                           temperature=args.temperature):  # fmt: skip
                    print(chunk.text, end="", flush=True)
                print()
    except MeshError as e:
        sys.exit(f"meshllm: {type(e).__name__}: {e.message}")


if __name__ == "__main__":
    main()
