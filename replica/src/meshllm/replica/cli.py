"""``meshllm-replica``: run one replica process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshllm.api.spec import DEFAULT_ENGINE, INT_FIELDS, ModelSpec
from meshllm.replica import model_cli
from meshllm.replica.config import ReplicaConfig
from meshllm.replica.engines import engine_names
from meshllm.replica.server import serve
from meshllm.server.logs import FORMATS
from meshllm.server.serving import distribution_version, run_command

_INT_HELP = {
    "inter_threads": "batches run in parallel",
    "intra_threads": "threads per batch",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="meshllm-replica",
        description="Serve one model on one device over gRPC "
        "(Generation, ReplicaControl, health, reflection). Other commands: "
        "'meshllm-replica convert MODEL.gguf OUT_DIR' and 'meshllm-replica prepare smollm2' "
        "(each with --help).",
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"meshllm-replica {distribution_version('meshllm-replica')}",
    )
    _server_args(p)
    _spec_args(p)
    _serving_args(p)
    return p.parse_args(argv)


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument(
        "--port", type=int, default=50061, help="port (0 picks a free one; default 50061)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    p.add_argument("--replica-id", default="", help="name in reports (default hostname:port)")


def _spec_args(p: argparse.ArgumentParser) -> None:
    """The model to load at start: one flag per ``ModelSpec`` field (the int ones from the spec)."""
    p.add_argument(
        "--model",
        default="",
        help="model to load at start: 'smollm2' (real, after 'prepare'), 'demo' or 'bench' "
        "(generated, random weights) or a model folder; "
        "omit to start idle and load through ReplicaControl",
    )
    p.add_argument(
        "--model-id",
        default="",
        help="id clients use (default: the built-in name or the folder name)",
    )
    p.add_argument("--engine", default=DEFAULT_ENGINE, choices=engine_names())
    p.add_argument(
        "--compute-type", default="", help="e.g. int8, float16, float32 (default: the engine's)"
    )
    for name in INT_FIELDS:
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=int, default=0, help=_INT_HELP.get(name))
    p.add_argument(
        "--chat-template", type=Path, help="file with a Jinja chat template to use instead"
    )
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="engine option"
    )


def _serving_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drain-grace",
        type=float,
        default=30.0,
        help="seconds in-flight work may finish on SIGTERM",
    )
    p.add_argument(
        "--batch-window-ms", type=float, default=2.0, help="wait for stragglers before a batch"
    )
    p.add_argument(
        "--default-coalesce-ms",
        type=int,
        default=10,
        help="for requests without stream_options: longest a chunk may hold tokens "
        "(0: one message per token when the reader keeps up)",
    )
    p.add_argument(
        "--in-process-engine",
        action="store_true",
        help="run the engine inside this process instead of a process of its own",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics over HTTP on this port (default: off)",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="also answer grpc.health.v1 (only) in plaintext on this port, "
        "for probes that cannot speak TLS (default: off)",
    )
    p.add_argument(
        "--tls-cert",
        default="",
        metavar="PEM",
        help="serve TLS with this certificate (with --tls-key; default: plaintext)",
    )
    p.add_argument("--tls-key", default="", metavar="PEM", help="private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        default="",
        metavar="PEM",
        help="mutual TLS: accept only clients with a certificate signed by this CA",
    )
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--log-format",
        default="text",
        choices=FORMATS,
        help="json: one object per line, with request fields (default text)",
    )


def spec_from_args(args: argparse.Namespace) -> ModelSpec | None:
    """The ``--model`` to load at start (None: start idle)."""
    if not args.model:
        return None
    return ModelSpec(
        id=args.model_id or Path(args.model).name,
        path=args.model,
        engine=args.engine,
        compute_type=args.compute_type,
        chat_template=args.chat_template.read_text() if args.chat_template else "",
        options=dict(o.split("=", 1) for o in args.option if "=" in o),
        **{name: getattr(args, name) for name in INT_FIELDS},
    )


def config_from_args(args: argparse.Namespace) -> ReplicaConfig:
    return ReplicaConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        replica_id=args.replica_id,
        model=spec_from_args(args),
        drain_grace_s=args.drain_grace,
        batch_window_ms=args.batch_window_ms,
        default_coalesce_ms=args.default_coalesce_ms,
        engine_process=not args.in_process_engine,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
    ).validate()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in model_cli.COMMANDS:
        sys.exit(model_cli.main(argv))
    args = parse_args(argv)
    run_command(
        "meshllm-replica", args.log_level, args.log_format, lambda: config_from_args(args), serve
    )


if __name__ == "__main__":
    main()
