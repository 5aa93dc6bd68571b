"""``meshllm``: the command line client."""

from __future__ import annotations

import argparse
import sys

from meshllm.api.errors import MeshError
from meshllm.api.tls import ChannelTLS
from meshllm.client._sync import Client


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="meshllm", description="meshllm command line client")
    p.add_argument("--target", default="localhost:50051", help="router or replica host:port")
    p.add_argument("--api-key", default=None)
    _add_tls_flags(p)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream one reply to the terminal")
    g.add_argument("prompt")
    g.add_argument("--model", required=True)
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--temperature", type=float)
    sub.add_parser("models", help="list the models that can serve requests")
    u = sub.add_parser("up", help="start a local mesh (a router and replicas) until Ctrl-C")
    u.add_argument("--replicas", type=int, default=2, help="replica processes (default 2)")
    u.add_argument(
        "--model", default="demo", help="'demo', 'bench' or a model folder (default demo)"
    )
    u.add_argument("--port", type=int, default=50051, help="router port (default 50051)")
    u.add_argument("--policy", default="least-busy", choices=("least-busy", "round-robin"))
    sub.add_parser("demo", help="start a local mesh on the demo model, stream a reply, run a batch")
    args = p.parse_args(argv)
    if args.command in ("up", "demo"):
        sys.exit(_local(args))
    try:
        with Client(args.target, api_key=args.api_key, tls=_tls(args)) as client:
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


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS", "default: plaintext, for local development only")
    g.add_argument("--tls", action="store_true", help="TLS trusting the system's root certificates")
    g.add_argument("--tls-ca", default="", metavar="PEM", help="TLS trusting this CA")
    g.add_argument("--tls-cert", default="", metavar="PEM",
                   help="client certificate, for mutual TLS (with --tls-key)")  # fmt: skip
    g.add_argument("--tls-key", default="", metavar="PEM", help="private key of --tls-cert")


def _tls(args: argparse.Namespace) -> ChannelTLS | None:
    """Any TLS flag turns TLS on; the files are read (and checked) here."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return ChannelTLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def _local(args: argparse.Namespace) -> int:
    """``up`` and ``demo`` run router and replica processes: they need those packages too."""
    try:
        from meshllm.router import demo, local
    except ImportError:
        print("meshllm: 'up' and 'demo' need meshllm-router and meshllm-replica[ctranslate2] "
              "installed next to the client", file=sys.stderr)  # fmt: skip
        return 2
    if args.command == "demo":
        demo.main()
        return 0
    config = local.LocalMeshConfig(replicas=args.replicas, model=args.model, port=args.port,
                                   policy=args.policy)  # fmt: skip
    try:
        return local.up(config)
    except (ValueError, RuntimeError, TimeoutError) as e:
        print(f"meshllm up: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    main()
