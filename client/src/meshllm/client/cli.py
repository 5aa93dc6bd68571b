"""``meshllm``: the command line client.

meshllm generate "Hello" --model demo                       stream one reply to the terminal
meshllm generate --input in.jsonl --output out.jsonl --model demo [--resume]
meshllm bench --model demo --max-concurrency 32 [--json]
meshllm admin models | replicas | load M | unload M | scale M N | drain R | undrain R | quota
meshllm models | up | demo
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
from pathlib import Path
from typing import Any

from meshllm.api.errors import MeshError
from meshllm.api.tls import ChannelTLS
from meshllm.client import demo, local
from meshllm.client._abort import AbortPolicy
from meshllm.client._async import AsyncClient
from meshllm.client._batch import BatchOptions
from meshllm.client._cache import ResponseCache
from meshllm.client._cli_admin import add_admin_parser, run_admin
from meshllm.client._cli_batch import JsonlJob, run_jsonl
from meshllm.client._cli_bench import BenchJob, levels_up_to, parse_levels, print_report, run_bench
from meshllm.client._options import RequestFields
from meshllm.client._pacing import Pacing
from meshllm.client._retry import RetryPolicy
from meshllm.client._sync import Client


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0: greedy (cacheable)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _fields(args: argparse.Namespace) -> RequestFields:
    return RequestFields(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshllm", description="meshllm command line client")
    p.add_argument("--target", default="localhost:50051", help="router or replica host:port")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=None, help="deadline per call, seconds")
    _add_tls_flags(p)
    sub = p.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    sub.add_parser("models", help="list the models that can serve requests")
    add_admin_parser(sub)
    _add_up(sub)
    sub.add_parser("demo", help="start a local mesh on the demo model, stream a reply, run a batch")
    return p


def _add_generate(sub: Any) -> None:
    g = sub.add_parser("generate", help="stream one reply, or run a JSONL file through the mesh")
    g.add_argument("prompt", nargs="?", help="one prompt to stream (or use --input)")
    _sampling(g)
    jsonl = g.add_argument_group("JSONL batch (docs/client.md)")
    jsonl.add_argument(
        "--input", type=Path, help='JSONL, one {"prompt": ...} or {"messages": [...]} a line'
    )
    jsonl.add_argument(
        "--output", type=Path, help="JSONL results, one row per input row (default: stdout)"
    )
    jsonl.add_argument("--resume", action="store_true", help="continue --output after a crash")
    jsonl.add_argument("--ordered", action="store_true", help="write rows in input order")
    jsonl.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    jsonl.add_argument(
        "--retries", type=int, default=5, help="retries per row of transient failures (5)"
    )
    jsonl.add_argument("--rpm", type=float, help="requests per minute at most")
    jsonl.add_argument(
        "--tpm", type=float, help="tokens per minute at most (prompt estimate + max_tokens)"
    )
    jsonl.add_argument("--abort-after", type=int, help="stop after this many rows failed in a row")
    jsonl.add_argument(
        "--abort-ratio", type=float, help="stop when more than this share of rows failed"
    )
    jsonl.add_argument("--no-progress", action="store_true", help="no progress bar")
    jsonl.add_argument("--cache", type=Path, help="SQLite response cache for greedy requests")
    jsonl.add_argument(
        "--refresh-cache", action="store_true", help="ask the server again, update the cache"
    )


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="sweep concurrency; throughput, latency, a recommended level")
    _sampling(b)
    levels = b.add_mutually_exclusive_group()
    levels.add_argument(
        "--max-concurrency", type=int, default=32, help="levels 1, 2, 4, ... up to this (32)"
    )
    levels.add_argument("--levels", help="explicit levels, e.g. 1,8,64")
    b.add_argument("--duration", type=float, default=5.0, help="seconds per level (5)")
    b.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per level (1)")
    b.add_argument("--prompt", default=BenchJob.__dataclass_fields__["prompt"].default)
    b.add_argument(
        "--max-p99-ms", type=float, help="recommend only levels with p99 latency within this"
    )
    b.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_up(sub: Any) -> None:
    u = sub.add_parser("up", help="start a local mesh (a router and replicas) until Ctrl-C")
    u.add_argument("--replicas", type=int, default=2, help="replica processes (default 2)")
    u.add_argument(
        "--model", default="demo", help="'demo', 'bench' or a model folder (default demo)"
    )
    u.add_argument(
        "--config",
        default="",
        help="router config whose [models.<id>] catalog says what goes where (instead of --model)",
    )
    u.add_argument("--port", type=int, default=50051, help="router port (default 50051)")
    http = u.add_mutually_exclusive_group()
    http.add_argument(
        "--http-port",
        type=int,
        help="the router's OpenAI-compatible HTTP port (default 8080; with --port 0, a free one)",
    )
    http.add_argument("--no-http", action="store_true", help="no OpenAI-compatible HTTP API")
    u.add_argument("--policy", default="least-busy", choices=("least-busy", "round-robin"))
    u.add_argument(
        "--tenants-file",
        default="",
        help="API keys and quotas for the router (with --api-key; default: no authentication)",
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command in ("up", "demo"):
        sys.exit(_local(args))
    try:
        if args.command == "generate" and args.input is not None:
            sys.exit(asyncio.run(_jsonl(args)))
        if args.command == "bench":
            sys.exit(asyncio.run(_bench(args)))
        if args.command == "admin":
            sys.exit(asyncio.run(run_admin(args, _tls(args))))
        with Client(
            args.target, api_key=args.api_key, timeout=args.timeout, tls=_tls(args)
        ) as client:
            if args.command == "models":
                for m in client.list_models():
                    print(
                        f"{m.id}\t{m.engine}\tcontext={m.context_length}\treplicas={m.ready_replicas}"
                    )
            elif args.prompt is None:
                sys.exit("meshllm generate: give a prompt, or --input FILE")
            else:
                chunks = client.stream_with(args.prompt, model=args.model, fields=_fields(args))
                for chunk in chunks:
                    print(chunk.text, end="", flush=True)
                print()
    except MeshError as e:
        sys.exit(f"meshllm: {type(e).__name__}: {e.message}")
    except KeyboardInterrupt:
        sys.exit(130)


async def _jsonl(args: argparse.Namespace) -> int:
    if args.resume and args.output is None:
        print("meshllm: --resume needs --output", file=sys.stderr)
        return 2
    cache = ResponseCache(args.cache, refresh=args.refresh_cache) if args.cache else None
    options = BatchOptions(
        concurrency=args.concurrency,
        ordered=args.ordered,
        retry=RetryPolicy(max_attempts=args.retries + 1),
        pacing=Pacing(requests_per_minute=args.rpm, tokens_per_minute=args.tpm),
        abort=AbortPolicy(
            max_consecutive_failures=args.abort_after, max_failure_ratio=args.abort_ratio
        ),
        progress=not args.no_progress,
    )
    job = JsonlJob(
        input=args.input,
        output=args.output,
        resume=args.resume,
        model=args.model,
        fields=_fields(args),
        options=options,
    )
    try:
        async with AsyncClient(
            args.target, api_key=args.api_key, timeout=args.timeout, tls=_tls(args), cache=cache
        ) as client:
            return await run_jsonl(client, job)
    finally:
        if cache is not None:  # the client closes only a cache it opened itself
            cache.close()


async def _bench(args: argparse.Namespace) -> int:
    levels = parse_levels(args.levels) if args.levels else levels_up_to(args.max_concurrency)
    job = BenchJob(
        model=args.model,
        levels=levels,
        duration_s=args.duration,
        warmup_s=args.warmup,
        prompt=args.prompt,
        fields=_fields(args),
        max_p99_ms=args.max_p99_ms,
    )
    async with AsyncClient(
        args.target, api_key=args.api_key, timeout=args.timeout, tls=_tls(args)
    ) as client:
        report = await run_bench(client, job)
    print_report(report, args.json)
    return 0


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS", "default: plaintext, for local development only")
    g.add_argument("--tls", action="store_true", help="TLS trusting the system's root certificates")
    g.add_argument("--tls-ca", default="", metavar="PEM", help="TLS trusting this CA")
    g.add_argument(
        "--tls-cert",
        default="",
        metavar="PEM",
        help="client certificate, for mutual TLS (with --tls-key)",
    )
    g.add_argument("--tls-key", default="", metavar="PEM", help="private key of --tls-cert")


def _tls(args: argparse.Namespace) -> ChannelTLS | None:
    """Any TLS flag turns TLS on; the files are read (and checked) here."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return ChannelTLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def _http_port(args: argparse.Namespace) -> int | None:
    if args.no_http:
        return None
    if args.http_port is not None:
        return int(args.http_port)
    return 0 if args.port == 0 else 8080


def _local(args: argparse.Namespace) -> int:
    """``up`` and ``demo`` start router and replica processes: those packages must be installed
    (the client itself imports neither)."""
    if any(importlib.util.find_spec(m) is None for m in ("meshllm.router", "meshllm.replica")):
        print(
            "meshllm: 'up' and 'demo' need meshllm-router and meshllm-replica[ctranslate2] "
            "installed next to the client",
            file=sys.stderr,
        )
        return 2
    if args.command == "demo":
        demo.main()
        return 0
    config = local.LocalMeshConfig(
        replicas=args.replicas,
        model=args.model,
        config=args.config,
        port=args.port,
        http_port=_http_port(args),
        policy=args.policy,
        tenants_file=args.tenants_file,
        api_key=args.api_key or "",
    )
    try:
        return local.up(config)
    except (ValueError, RuntimeError, TimeoutError) as e:
        print(f"meshllm up: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    main()
