"""``meshllm admin ...``: the router's Admin service from the command line (admin key needed).

Calls go through :class:`AsyncAdminClient` (domain types); ``--json`` prints the reply's wire
form (``meshllm.api.convert``), as the service sends it."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from meshllm.api import convert
from meshllm.api.errors import InvalidArgument
from meshllm.api.spec import SPEC_FIELDS
from meshllm.api.types import LoadReport, ModelPlacement, QuotaUsage, ReplicaState, ReplicaStatus
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.client._admin import AsyncAdminClient
from meshllm.client._cli_args import Connection, number, whole

_GiB = 1024**3
_NO_LOAD = LoadReport(replica_id="", state=ReplicaState.UNKNOWN, model="")
_STATE = {state: state.value for state in ReplicaState} | {ReplicaState.UNKNOWN: "unspecified"}
"""A state's name in the table (a replica that never reported shows as the wire calls it)."""


def add_admin_parser(sub: Any, after: argparse.ArgumentParser) -> None:
    """``after``: the connection options, accepted after ``admin`` and after its command too."""
    a = sub.add_parser(
        "admin",
        help="operate the mesh: models, replicas, load/unload/scale/drain",
        parents=[after],
    )
    common = argparse.ArgumentParser(add_help=False, parents=[after])
    common.add_argument("--json", action="store_true", help="print the reply as JSON")
    cmds = a.add_subparsers(dest="admin_command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = cmds.add_parser(name, help=help, parents=[common])
        return parser

    command("models", "catalog and loaded models, with each replica's state")
    command("replicas", "every replica: state, model, load, device memory")
    load = command("load", "put a catalog model on (at least) N replicas")
    load.add_argument("model")
    load.add_argument(
        "--replicas",
        type=whole(0),
        default=0,
        help="at least this many (default: the catalog's desired_replicas, at least 1)",
    )
    load.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="one-off change to the catalog's spec, e.g. max_batch_size=8 or "
        "options.cache_size=8192 (repeatable)",
    )
    load.add_argument("--no-wait", action="store_true", help="return once the loads started")
    unload = command("unload", "drain and unload a model from every replica")
    unload.add_argument("model")
    unload.add_argument(
        "--drain-timeout",
        type=number(0),
        default=0.0,
        help="seconds in-flight requests may finish (default: the router's)",
    )
    scale = command("scale", "set how many replicas host a model (within the catalog's max)")
    scale.add_argument("model")
    scale.add_argument("replicas", type=whole(0))
    scale.add_argument("--drain-timeout", type=number(0), default=0.0)
    scale.add_argument("--no-wait", action="store_true")
    for name, what in (("drain", "stop new requests to"), ("undrain", "send requests again to")):
        command(name, f"{what} one replica (it keeps its model)").add_argument("replica")
    quota = command("quota", "quota use per tenant")
    quota.add_argument("tenant", nargs="?", default="")


def overrides(pairs: Sequence[str]) -> dict[str, str | int | dict[str, str]]:
    """``FIELD=VALUE`` pairs as spec overrides (``AdminClient.load_model``); a bad one names
    itself."""
    out: dict[str, str | int | dict[str, str]] = {}
    options: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if name.startswith("options.") and sep:
            options[name.removeprefix("options.")] = value
            continue
        kind = SPEC_FIELDS.get(name)
        if not sep or kind is None or name in ("id", "options"):
            settable = [*sorted(set(SPEC_FIELDS) - {"id", "options"}), "options.KEY"]
            raise InvalidArgument(
                f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(settable)}"
            )
        try:
            out[name] = int(value) if kind == "int" else value
        except ValueError:
            raise InvalidArgument(f"--set {pair!r}: {name} takes a whole number") from None
    if options:
        out["options"] = options
    return out


@dataclass(frozen=True, kw_only=True)
class Reply:
    """An Admin reply as the CLI prints it."""

    lines: list[str]
    """The plain-text table."""
    wire: Message
    """The reply as the wire message, for ``--json``."""


async def _reply(admin: AsyncAdminClient, args: argparse.Namespace) -> Reply:
    c = args.admin_command
    if c == "models":
        models = await admin.list_models()
        return Reply(
            lines=render_placements(models),
            wire=adm.AdminListModelsResponse(models=map(convert.placement_to_pb, models)),
        )
    if c == "replicas":
        replicas = await admin.list_replicas()
        return Reply(
            lines=render_replicas(replicas) or ["(no replicas)"],
            wire=adm.ListReplicasResponse(replicas=map(convert.status_to_pb, replicas)),
        )
    if c == "quota":
        usage = await admin.quota_usage(args.tenant)
        return Reply(
            lines=render_quota(usage),
            wire=adm.GetQuotaUsageResponse(usage=map(convert.quota_usage_to_pb, usage)),
        )
    if c in ("drain", "undrain"):
        call = admin.drain_replica if c == "drain" else admin.undrain_replica
        status = await call(args.replica)
        return Reply(lines=render_replicas([status]), wire=convert.status_to_pb(status))
    placement = await _placement_call(admin, args)
    return Reply(lines=render_placement(placement), wire=convert.placement_to_pb(placement))


async def _placement_call(admin: AsyncAdminClient, args: argparse.Namespace) -> ModelPlacement:
    c = args.admin_command
    if c == "load":
        return await admin.load_model(
            args.model, replicas=args.replicas, overrides=overrides(args.set), wait=not args.no_wait
        )
    if c == "unload":
        return await admin.unload_model(args.model, drain_timeout_s=args.drain_timeout)
    assert c == "scale", c  # argparse allows no other command
    return await admin.scale_model(
        args.model, args.replicas, drain_timeout_s=args.drain_timeout, wait=not args.no_wait
    )


async def run_admin(args: argparse.Namespace, conn: Connection) -> int:
    """One Admin call; prints the reply (a table, or JSON with --json)."""
    async with AsyncAdminClient(
        conn.target, api_key=conn.api_key, timeout=conn.timeout, tls=conn.tls
    ) as admin:
        reply = await _reply(admin, args)
    if args.json:
        print(json.dumps(MessageToDict(reply.wire, preserving_proto_field_name=True), indent=2))
    else:
        print("\n".join(reply.lines))
    return 0


def render_placements(models: Sequence[ModelPlacement]) -> list[str]:
    return [line for m in models for line in render_placement(m)] or ["(no models)"]


def render_quota(usage: Sequence[QuotaUsage]) -> list[str]:
    rows = [
        (u.tenant, u.limit, f"{u.used}/{u.limit_value}", f"resets in {u.resets_in_s:.0f}s")
        for u in usage
    ]
    return _table(rows) or ["(no limits)"]


def render_placement(m: ModelPlacement) -> list[str]:
    """A model's head line, then its replicas indented."""
    cap = f", max {m.max_replicas}" if m.max_replicas else ""
    origin = f"desired {m.desired_replicas}{cap}" if m.configured else "not in the catalog"
    head = f"{m.model}: {m.ready_replicas} ready ({origin})"
    rows = render_replicas(m.replicas)
    return [head + (f" - {m.pending}" if m.pending else ""), *(f"  {row}" for row in rows)]


def render_replicas(replicas: Sequence[ReplicaStatus]) -> list[str]:
    """One aligned row per replica."""
    return _table([_replica_row(r) for r in replicas])


def _replica_row(r: ReplicaStatus) -> tuple[str, ...]:
    mem, load = r.memory, r.load or _NO_LOAD
    memory = (
        f"{mem.used_bytes / _GiB:.2f}/{mem.total_bytes / _GiB:.1f} GiB ({mem.source})"
        if mem is not None and mem.total_bytes
        else "memory ?"
    )
    return (
        r.replica_id,
        _STATE[r.state],
        r.model or "-",
        r.device or "?",
        f"{load.running} running",
        f"{load.queued} queued",
        f"{load.tokens_per_second:.0f} tok/s",
        memory,
        f"error: {r.error}" if r.error else "",
    )


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows with each column padded to its widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
