"""``meshllm-router``: run the router in front of replicas."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshllm.api.errors import InvalidArgument
from meshllm.router.config import (
    POLICIES,
    STORE_FAILURE_POLICIES,
    RouterConfig,
    from_environment,
    merged,
    nest,
    read_config_file,
)
from meshllm.router.quota import STORES
from meshllm.router.server import serve
from meshllm.router.tenants import hash_key, is_tenant_name, new_key
from meshllm.server.logs import FORMATS
from meshllm.server.serving import distribution_version, run_command

# flag dest -> flat setting name (config.FLAT_NAMES places it), for flags that override the file
_OVERRIDES = {
    "refresh": "refresh_s",
    "stale_after": "stale_after_s",
    "drain_grace": "drain_grace_s",
    **{
        name: name
        for name in (
            "host",
            "port",
            "replicas_file",
            "dns",
            "policy",
            "tokens_per_request",
            "max_attempts",
            "report_interval_ms",
            "metrics_port",
            "health_port",
            "http_port",
            "tenants_file",
            "quota_store",
            "redis_url",
            "redis_url_file",
            "redis_unavailable",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "replica_tls_ca",
            "replica_tls_cert",
            "replica_tls_key",
            "replica_tls_server_name",
            "share_placement_counts",
            "fair_queue",
            "replica_queue",
            "outlier_ejection",
        )
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="meshllm-router",
        description="Route meshllm.api.v1.Generation calls to the least busy replica. Key tools: "
        "'meshllm-router new-key TENANT [user|admin]', 'meshllm-router hash-key' (key on stdin).",
    )
    p.add_argument(
        "--version",
        action="version",
        version=f"meshllm-router {distribution_version('meshllm-router')}",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="TOML file: [router] and its sub-tables, [models.<id>] (flags override it)",
    )
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port (0 picks a free one; default 50051)")
    p.add_argument("--policy", choices=POLICIES, help="routing policy (default least-busy)")
    p.add_argument(
        "--tokens-per-request",
        type=int,
        help="tokens in flight that weigh as much as one request (default 256)",
    )
    p.add_argument(
        "--max-attempts", type=int, help="replicas tried before the first token (default 3)"
    )
    p.add_argument(
        "--drain-grace", type=float, help="seconds in-flight streams may finish on SIGTERM (30)"
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this HTTP port")
    p.add_argument(
        "--health-port",
        type=int,
        help="also answer grpc.health.v1 (only) in plaintext on this port, for probes that "
        "cannot speak TLS (default: off)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, ...) on "
        "this port (0 picks a free one; default: off; docs/http.md)",
    )
    p.add_argument(
        "--outlier-ejection",
        action=argparse.BooleanOptionalAction,
        help="eject replicas that fail requests fast, for a backoff (default on; "
        "[router.outliers] in --config tunes it)",
    )
    _add_discovery_flags(p)
    _add_access_flags(p)
    _add_tls_flags(p)
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--log-format",
        default="text",
        choices=FORMATS,
        help="json: one object per line, with request fields (default text)",
    )
    return p.parse_args(argv)


def _add_discovery_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas", "where they are and how they are followed")
    g.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a replica address (repeatable)",
    )
    g.add_argument("--replicas-file", help="file with one HOST:PORT per line, re-read periodically")
    g.add_argument(
        "--dns",
        metavar="NAME:PORT",
        help="re-resolved periodically; each address is a replica (headless Service)",
    )
    g.add_argument("--refresh", type=float, help="seconds between file/DNS refreshes (default 5)")
    g.add_argument(
        "--report-interval-ms", type=int, help="load-report period asked of replicas (default 250)"
    )
    g.add_argument(
        "--stale-after", type=float, help="seconds without a report before ejection (default 2)"
    )
    g.add_argument(
        "--no-fair-queue",
        dest="fair_queue",
        action="store_const",
        const=False,
        help="send every request at once, to wait first come first served in the replicas' "
        "queues (default: the router's fair queue holds requests while a model is saturated)",
    )
    g.add_argument(
        "--replica-queue",
        type=int,
        help="requests a replica may hold waiting beyond its capacity before the router "
        "queues them (default 0)",
    )


def _add_access_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("access", "API keys, quotas and the Redis routers share")
    g.add_argument("--tenants-file", help="TOML file of tenants, key hashes and quotas")
    g.add_argument(
        "--no-auth",
        action="store_true",
        help="no API keys: every caller is an admin (local development only)",
    )
    g.add_argument(
        "--quota-store", choices=STORES, help="where quota counters live (default memory)"
    )
    g.add_argument(
        "--redis-url",
        help="redis://host:port/db (or MESHLLM_REDIS_URL, to keep a password off the command line)",
    )
    g.add_argument(
        "--redis-url-file",
        metavar="PATH",
        help="a file holding the Redis URL, e.g. a mounted Secret (instead of --redis-url)",
    )
    g.add_argument(
        "--redis-unavailable",
        choices=STORE_FAILURE_POLICIES,
        help="when Redis is unreachable: deny requests (default) or allow them unmetered",
    )
    g.add_argument(
        "--share-placement-counts",
        action="store_true",
        default=None,
        help="keep desired replica counts in Redis too, shared by every router using it",
    )


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS", "default: plaintext, for local development only (docs/tls.md)")
    g.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="serve clients over TLS with this certificate (with --tls-key)",
    )
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    g.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="mutual TLS: accept only clients with a certificate signed by this CA",
    )
    g.add_argument(
        "--replica-tls-ca", metavar="PEM", help="reach replicas over TLS, trusting this CA"
    )
    g.add_argument(
        "--replica-tls-cert",
        metavar="PEM",
        help="client certificate for replicas that run mutual TLS (with --replica-tls-key)",
    )
    g.add_argument("--replica-tls-key", metavar="PEM", help="private key of --replica-tls-cert")
    g.add_argument(
        "--replica-tls-server-name",
        metavar="NAME",
        help="check replicas' certificates against this name (default: each address's host)",
    )


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """The config file's settings (if any), the flags given on top, then the environment."""
    flags = {
        name: getattr(args, flag)
        for flag, name in _OVERRIDES.items()
        if getattr(args, flag) is not None
    }
    if args.no_auth:
        flags["auth"] = "none"
    settings = merged(read_config_file(args.config) if args.config else {}, nest(flags))
    settings = from_environment(settings)
    if args.replica:
        discovery = dict(settings.get("discovery", {}))
        discovery["replicas"] = (*discovery.get("replicas", ()), *args.replica)
        settings["discovery"] = discovery
    config = RouterConfig.from_mapping(settings).validate()
    if not config.discovery.has_source:
        raise InvalidArgument("no replicas: give --replica, --replicas-file or --dns")
    return config


def _keys_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshllm-router", description="API key tools")
    tools = p.add_subparsers(dest="tool", required=True)
    tools.add_parser(
        "hash-key",
        help="the tenants-file line for a key read from stdin",
        description="Read a key from stdin (never an argument: shell history) and print the "
        "line to store for it in a tenants file.",
    )
    new = tools.add_parser(
        "new-key",
        help="a fresh key for a tenant",
        description="Make a fresh key: the key itself goes to stderr, shown once; the "
        "tenants-file entry (its hash) to stdout, so `new-key NAME >> tenants.toml` stores "
        "only the hash.",
    )
    new.add_argument("tenant", type=_tenant_name, help="the tenant's name")
    new.add_argument("role", nargs="?", default="user", choices=("user", "admin"))
    return p


def _tenant_name(text: str) -> str:
    if not is_tenant_name(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a tenant name is 1-63 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return text


def keys_command(argv: list[str]) -> int:
    """``hash-key``: the line to store for a key read from stdin. ``new-key NAME [ROLE]``: a
    fresh key, shown once on stderr, and its tenants-file entry on stdout."""
    try:
        args = _keys_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    if args.tool == "hash-key":
        key = sys.stdin.readline().strip()
        if not key:
            print("meshllm-router hash-key: give the key on stdin", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    key = new_key()
    # the key to the terminal (stderr), the entry to stdout: `new-key x >> tenants.toml` stores
    # only the hash
    print(f"API key for {args.tenant} (shown once; give it to the tenant): {key}", file=sys.stderr)
    print(f'[[tenants]]\nname = "{args.tenant}"\nrole = "{args.role}"\nkeys = ["{hash_key(key)}"]')
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["hash-key"], ["new-key"]):
        sys.exit(keys_command(argv))
    args = parse_args(argv)
    run_command(
        "meshllm-router", args.log_level, args.log_format, lambda: config_from_args(args), serve
    )


if __name__ == "__main__":
    main()
