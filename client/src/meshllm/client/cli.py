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
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from meshllm.api.errors import MeshError
from meshllm.client import demo, local
from meshllm.client._abort import AbortPolicy
from meshllm.client._async import AsyncClient
from meshllm.client._batch import BatchOptions
from meshllm.client._cache import ResponseCache
from meshllm.client._cli_admin import add_admin_parser, run_admin
from meshllm.client._cli_args import (
    UINT32_MAX,
    UINT64_MAX,
    Connection,
    UsageError,
    add_connection_options,
    add_key_options,
    api_key,
    connection,
    distribution_version,
    number,
    readable_file,
    whole,
)
from meshllm.client._cli_args import levels as parse_levels
from meshllm.client._cli_batch import JsonlJob, run_jsonl
from meshllm.client._cli_bench import (
    BenchJob,
    levels_up_to,
    print_report,
    report_status,
    run_bench,
)
from meshllm.client._options import RequestFields
from meshllm.client._pacing import Pacing
from meshllm.client._retry import RetryPolicy
from meshllm.client._sync import Client


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit status 2), not the usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (--help for usage)\n")


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--max-tokens", type=whole(1, UINT32_MAX))
    p.add_argument("--temperature", type=number(0), help="0: greedy (cacheable)")
    p.add_argument("--top-k", type=whole(0, UINT32_MAX), help="0: no limit; 1: greedy")
    p.add_argument("--top-p", type=number(0, above=True, high=1))
    p.add_argument(
        "--repetition-penalty", type=number(0, above=True), help="above 1 discourages repeats"
    )
    p.add_argument("--seed", type=whole(0, UINT64_MAX))
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--system",
        metavar="TEXT",
        help="system text (the request's instructions): a chat's leading system message",
    )


def _fields(args: argparse.Namespace) -> RequestFields:
    return RequestFields(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        instructions=args.system,
    )


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="meshllm", description="meshllm command line client")
    p.add_argument(
        "--version", action="version", version=f"meshllm {distribution_version('meshllm-client')}"
    )
    add_connection_options(p, default=None)
    after = _Parser(add_help=False)  # the same options, accepted after the subcommand
    add_connection_options(after, default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    _add_generate(sub, after)
    _add_bench(sub, after)
    sub.add_parser("models", help="list the models that can serve requests", parents=[after])
    add_admin_parser(sub, after)
    _add_up(sub)
    sub.add_parser(
        "demo", help="start a local mesh on SmolLM2 (real, built in), stream a reply, run a batch"
    )
    return p


def _add_generate(sub: Any, after: argparse.ArgumentParser) -> None:
    g = sub.add_parser(
        "generate", help="stream one reply, or run a JSONL file through the mesh", parents=[after]
    )
    g.add_argument("prompt", nargs="?", help="one prompt to stream (or use --input)")
    _sampling(g)
    g.add_argument(
        "--chat",
        action="store_true",
        help='send the prompt as a chat, [{"role": "user", "content": PROMPT}], so the '
        "model's chat template applies (with --input: every row's prompt)",
    )
    jsonl = g.add_argument_group("JSONL batch (docs/client.md)")
    jsonl.add_argument(
        "--input",
        type=readable_file,
        help='JSONL, one {"prompt": ...} or {"messages": [...]} a line',
    )
    jsonl.add_argument(
        "--output", type=Path, help="JSONL results, one row per input row (default: stdout)"
    )
    jsonl.add_argument("--resume", action="store_true", help="continue --output after a crash")
    jsonl.add_argument("--ordered", action="store_true", help="write rows in input order")
    jsonl.add_argument("--concurrency", type=whole(1), default=32, help="requests in flight (32)")
    jsonl.add_argument(
        "--retries", type=whole(0), default=5, help="retries per row of transient failures (5)"
    )
    jsonl.add_argument("--rpm", type=number(0, above=True), help="requests per minute at most")
    jsonl.add_argument(
        "--tpm",
        type=number(0, above=True),
        help="tokens per minute at most (prompt estimate + max_tokens)",
    )
    jsonl.add_argument(
        "--abort-after", type=whole(1), help="stop after this many rows failed in a row"
    )
    jsonl.add_argument(
        "--abort-ratio",
        type=number(0, high=1, below=True),
        help="stop when more than this share of rows failed (0 <= R < 1)",
    )
    jsonl.add_argument("--no-progress", action="store_true", help="no progress bar")
    jsonl.add_argument(
        "--heartbeat",
        type=number(0),
        default=30.0,
        metavar="S",
        help="without a progress bar: a status line on stderr every S seconds (30; 0: none)",
    )
    jsonl.add_argument(
        "--stall-warning",
        type=number(0),
        default=300.0,
        metavar="S",
        help="warn on stderr when no row finished for S seconds (300; 0: never)",
    )
    jsonl.add_argument("--cache", type=Path, help="SQLite response cache for greedy requests")
    jsonl.add_argument(
        "--refresh-cache", action="store_true", help="ask the server again, update the cache"
    )


def _add_bench(sub: Any, after: argparse.ArgumentParser) -> None:
    b = sub.add_parser(
        "bench",
        help="sweep concurrency; throughput, latency, a recommended level",
        parents=[after],
    )
    _sampling(b)
    levels = b.add_mutually_exclusive_group()
    levels.add_argument(
        "--max-concurrency",
        type=whole(1),
        default=32,
        help="levels 1, 2, 4, ... up to this (32)",
    )
    levels.add_argument("--levels", type=parse_levels, help="explicit levels, e.g. 1,8,64")
    b.add_argument(
        "--duration", type=number(0, above=True), default=5.0, help="seconds per level (5)"
    )
    b.add_argument("--warmup", type=number(0), default=1.0, help="warm-up seconds per level (1)")
    b.add_argument("--prompt", default=BenchJob.__dataclass_fields__["prompt"].default)
    b.add_argument(
        "--max-p99-ms",
        type=number(0, above=True),
        help="recommend only levels with p99 latency within this",
    )
    b.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_up(sub: Any) -> None:
    u = sub.add_parser("up", help="start a local mesh (a router and replicas) until Ctrl-C")
    u.add_argument("--replicas", type=whole(1), default=2, help="replica processes (default 2)")
    u.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (real, built in; default), 'demo' or 'bench' (generated, random weights, "
        "instant) or a model folder",
    )
    u.add_argument(
        "--config",
        default="",
        help="router config whose [models.<id>] catalog says what goes where (instead of --model)",
    )
    u.add_argument(
        "--port", type=whole(0, 65535), default=50051, help="router port (default 50051)"
    )
    http = u.add_mutually_exclusive_group()
    http.add_argument(
        "--http-port",
        type=whole(0, 65535),
        help="the router's OpenAI-compatible HTTP port (default 8080; with --port 0, a free one)",
    )
    http.add_argument("--no-http", action="store_true", help="no OpenAI-compatible HTTP API")
    u.add_argument("--policy", default="least-busy", choices=("least-busy", "round-robin"))
    u.add_argument(
        "--tenants-file",
        default="",
        help="API keys and quotas for the router (with an API key; default: no authentication)",
    )
    add_key_options(u, default=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("up", "demo"):
            sys.exit(_local(args, api_key(args, os.environ)))
        conn = connection(args, os.environ)
    except UsageError as e:
        parser.error(str(e))
    try:
        status = _command(args, conn)
        sys.stdout.flush()  # here, so that a reader that left is caught below, not at exit
    except MeshError as e:
        sys.exit(f"meshllm: {type(e).__name__}: {e.message}")
    except BrokenPipeError:  # `meshllm ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:  # an output file that cannot be written, say
        sys.exit(f"meshllm: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    if status:
        sys.exit(status)


def _command(args: argparse.Namespace, conn: Connection) -> int:
    """Run one client command; its exit status."""
    if args.command == "generate" and args.input is not None:
        return asyncio.run(_jsonl(args, conn))
    if args.command == "bench":
        return asyncio.run(_bench(args, conn))
    if args.command == "admin":
        return asyncio.run(run_admin(args, conn))
    with Client(conn.target, api_key=conn.api_key, timeout=conn.timeout, tls=conn.tls) as client:
        if args.command == "models":
            for m in client.list_models():
                print(
                    f"{m.id}\t{m.engine}\tcontext={m.context_length}\treplicas={m.ready_replicas}"
                )
            return 0
        if args.prompt is None:
            print("meshllm generate: give a prompt, or --input FILE", file=sys.stderr)
            return 2
        prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
        for chunk in client.stream_with(prompt, model=args.model, fields=_fields(args)):
            print(chunk.text, end="", flush=True)
        print()
    return 0


async def _jsonl(args: argparse.Namespace, conn: Connection) -> int:
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
        chat=args.chat,
        options=options,
        heartbeat_s=0.0 if options.progress else args.heartbeat,
        stall_s=args.stall_warning,
    )
    try:
        async with AsyncClient(
            conn.target, api_key=conn.api_key, timeout=conn.timeout, tls=conn.tls, cache=cache
        ) as client:
            return await run_jsonl(client, job)
    finally:
        if cache is not None:  # the client closes only a cache it opened itself
            cache.close()


async def _bench(args: argparse.Namespace, conn: Connection) -> int:
    job = BenchJob(
        model=args.model,
        levels=args.levels or levels_up_to(args.max_concurrency),
        duration_s=args.duration,
        warmup_s=args.warmup,
        prompt=args.prompt,
        fields=_fields(args),
        max_p99_ms=args.max_p99_ms,
    )
    async with AsyncClient(
        conn.target, api_key=conn.api_key, timeout=conn.timeout, tls=conn.tls
    ) as client:
        report = await run_bench(client, job)
    print_report(report, args.json)
    return report_status(report)


def _http_port(args: argparse.Namespace) -> int | None:
    if args.no_http:
        return None
    if args.http_port is not None:
        return int(args.http_port)
    return 0 if args.port == 0 else 8080


def _local(args: argparse.Namespace, key: str | None) -> int:
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
        api_key=key or "",
    )
    try:
        return local.up(config)
    except (ValueError, RuntimeError, TimeoutError) as e:
        print(f"meshllm up: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    main()
