"""``meshllm admin ...``: the router's Admin service from the command line (admin key needed)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from meshllm.api.errors import InvalidArgument, from_rpc_error
from meshllm.api.tls import ChannelTLS, channel
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.api.v1 import replica_control_pb2 as rc

_STATE = {v: k.removeprefix("REPLICA_STATE_").lower() for k, v in rc.ReplicaState.items()}
_GiB = 1024**3


def add_admin_parser(sub: Any) -> None:
    a = sub.add_parser("admin", help="operate the mesh: models, replicas, load/unload/scale/drain")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the reply as JSON")
    cmds = a.add_subparsers(dest="admin_command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = cmds.add_parser(name, help=help, parents=[common])
        return parser

    command("models", "catalog and loaded models, with each replica's state")
    command("replicas", "every replica: state, model, load, device memory")
    load = command("load", "put a catalog model on (at least) N replicas")
    load.add_argument("model")
    load.add_argument("--replicas", type=int, default=0,
                      help="at least this many (default: the catalog's desired_replicas, at least 1)")  # fmt: skip
    load.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="one-off change to the catalog's spec, e.g. max_batch_size=8 or "
                      "options.cache_size=8192 (repeatable)")  # fmt: skip
    load.add_argument("--no-wait", action="store_true", help="return once the loads started")
    unload = command("unload", "drain and unload a model from every replica")
    unload.add_argument("model")
    unload.add_argument("--drain-timeout", type=float, default=0.0,
                        help="seconds in-flight requests may finish (default: the router's)")  # fmt: skip
    scale = command("scale", "set how many replicas host a model (within the catalog's max)")
    scale.add_argument("model")
    scale.add_argument("replicas", type=int)
    scale.add_argument("--drain-timeout", type=float, default=0.0)
    scale.add_argument("--no-wait", action="store_true")
    for name, what in (("drain", "stop new requests to"), ("undrain", "send requests again to")):
        command(name, f"{what} one replica (it keeps its model)").add_argument("replica")
    quota = command("quota", "quota use per tenant")
    quota.add_argument("tenant", nargs="?", default="")


def overrides(pairs: Sequence[str]) -> rc.ModelSpec:
    """``FIELD=VALUE`` pairs as a ModelSpec of overrides; a bad one names itself."""
    spec, fields = rc.ModelSpec(), rc.ModelSpec.DESCRIPTOR.fields_by_name
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if name.startswith("options.") and sep:
            spec.options[name.removeprefix("options.")] = value
            continue
        field = fields.get(name)
        if not sep or field is None or name in ("id", "options"):
            settable = [*sorted(set(fields) - {"id", "options"}), "options.KEY"]
            raise InvalidArgument(
                f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(settable)}"
            )
        try:
            setattr(spec, name, int(value) if field.type == field.TYPE_UINT32 else value)
        except ValueError:
            raise InvalidArgument(f"--set {pair!r}: {name} takes a whole number") from None
    return spec


def _request(args: argparse.Namespace) -> tuple[str, Message]:
    c = args.admin_command
    requests: dict[str, Any] = {
        "models": lambda: ("ListModels", adm.AdminListModelsRequest()),
        "replicas": lambda: ("ListReplicas", adm.ListReplicasRequest()),
        "load": lambda: ("LoadModel", adm.AdminLoadModelRequest(
            model=args.model, replicas=args.replicas, overrides=overrides(args.set), wait=not args.no_wait)),
        "unload": lambda: ("UnloadModel", adm.AdminUnloadModelRequest(
            model=args.model, drain_timeout_s=args.drain_timeout)),
        "scale": lambda: ("ScaleModel", adm.ScaleModelRequest(
            model=args.model, replicas=args.replicas, drain_timeout_s=args.drain_timeout, wait=not args.no_wait)),
        "drain": lambda: ("DrainReplica", adm.DrainReplicaRequest(replica_id=args.replica)),
        "undrain": lambda: ("UndrainReplica", adm.UndrainReplicaRequest(replica_id=args.replica)),
        "quota": lambda: ("GetQuotaUsage", adm.GetQuotaUsageRequest(tenant=args.tenant)),
    }  # fmt: skip
    method, request = requests[c]()
    return method, request


async def run_admin(args: argparse.Namespace, tls: ChannelTLS | None) -> int:
    """One Admin call; prints the reply (a table, or JSON with --json)."""
    method, request = _request(args)
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None
    async with channel(args.target, tls) as ch:
        try:
            reply = await getattr(adm_grpc.AdminStub(ch), method)(
                request, metadata=metadata, timeout=args.timeout
            )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    else:
        print("\n".join(render(reply)))
    return 0


def render(reply: Message) -> list[str]:
    """Plain-text lines for an Admin reply."""
    if isinstance(reply, adm.AdminListModelsResponse):
        return [line for m in reply.models for line in _placement(m)] or ["(no models)"]
    if isinstance(reply, adm.ModelPlacement):
        return _placement(reply)
    if isinstance(reply, adm.ListReplicasResponse):
        return _replicas(reply.replicas) or ["(no replicas)"]
    if isinstance(reply, rc.ReplicaStatus):
        return _replicas([reply])
    if isinstance(reply, adm.GetQuotaUsageResponse):
        rows = [(u.tenant, u.limit, f"{u.used}/{u.limit_value}", f"resets in {u.resets_in_s:.0f}s")
                for u in reply.usage]  # fmt: skip
        return _table(rows) or ["(no limits)"]
    return [str(reply)]


def _placement(m: adm.ModelPlacement) -> list[str]:
    cap = f", max {m.max_replicas}" if m.max_replicas else ""
    origin = f"desired {m.desired_replicas}{cap}" if m.configured else "not in the catalog"
    head = f"{m.model}: {m.ready_replicas} ready ({origin})"
    rows = _replicas(m.replicas)
    return [head + (f" - {m.pending}" if m.pending else ""), *(f"  {row}" for row in rows)]


def _replicas(replicas: Sequence[rc.ReplicaStatus]) -> list[str]:
    rows = []
    for r in replicas:
        mem = r.memory
        memory = (
            f"{mem.used_bytes / _GiB:.2f}/{mem.total_bytes / _GiB:.1f} GiB ({mem.source})"
            if mem.total_bytes
            else "memory ?"
        )
        rows.append((r.replica_id, _STATE.get(r.state, "?"), r.spec.id or "-", r.device or "?",
                     f"{r.load.running} running", f"{r.load.queued} queued",
                     f"{r.load.tokens_per_second:.0f} tok/s", memory, f"error: {r.error}" if r.error else ""))  # fmt: skip
    return _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows with each column padded to its widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
