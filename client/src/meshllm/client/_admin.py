"""AsyncAdminClient / AdminClient: the router's ``Admin`` service from Python (admin key needed).

Replies are the shared domain types of ``meshllm.api.types`` (``ModelPlacement``,
``ReplicaStatus``, ``QuotaUsage``), converted by ``meshllm.api.convert``; protobuf stays here.
``AdminClient`` is the blocking twin (the same methods, run on a private loop; a test pins the
two signatures to each other)::

    with AdminClient("localhost:50051", api_key=ADMIN_KEY) as admin:
        placement = admin.load_model("demo", replicas=2)
        print(placement.ready_replicas, [r.replica_id for r in placement.replicas])
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import grpc

from meshllm.api import convert
from meshllm.api.errors import InvalidArgument, from_rpc_error
from meshllm.api.spec import SPEC_FIELDS
from meshllm.api.tls import ChannelTLS
from meshllm.api.types import ModelPlacement, QuotaUsage, ReplicaStatus
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.client._connection import Connected, Connection, SyncTwin
from meshllm.client._options import (
    USE_CLIENT_DEFAULT,
    CallTimeout,
    TimeoutArg,
    resolve_timeout,
)

R = TypeVar("R")
SpecOverrides = Mapping[str, str | int | Mapping[str, str]]
"""One-off changes to a catalog model's spec for one load: ``ModelSpec`` field names (not
``id``) to values, ``options`` merged into the catalog's options."""
OVERRIDABLE = tuple(sorted(set(SPEC_FIELDS) - {"id"}))


def overrides_to_pb(overrides: SpecOverrides) -> rc.ModelSpec:
    """The wire form of ``overrides``; a field that is not a spec field, or a value of the wrong
    type, is ``InvalidArgument`` naming it."""
    spec = rc.ModelSpec()
    for name, value in overrides.items():
        kind = SPEC_FIELDS.get(name) if name != "id" else None
        if kind == "Mapping[str, str]" and isinstance(value, Mapping):
            spec.options.update({str(k): str(v) for k, v in value.items()})
        elif kind == "str" and isinstance(value, str):
            setattr(spec, name, value)
        elif kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise InvalidArgument(f"overrides: {name} must not be negative, got {value}")
            setattr(spec, name, value)
        else:
            raise InvalidArgument(
                f"overrides: {name}={value!r} is not a spec field of its type "
                f"(fields: {', '.join(OVERRIDABLE)})"
            )
    return spec


class AsyncAdminClient(Connected[adm_grpc.AdminStub]):
    """Client of a router's ``Admin`` service: the catalog's placement, replicas, quota use.

    Args:
      target: the router's ``host:port``.
      api_key: an admin tenant's key (sent as ``authorization: Bearer <key>``).
      timeout: every call's deadline unless the call gives its own (None: no deadline); a
        waiting ``load_model`` or ``scale_model`` lasts as long as the loads take.
      tls: as for :class:`AsyncClient`.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: TimeoutArg = None,
        tls: ChannelTLS | bool | None = None,
    ) -> None:
        self._conn = Connection(
            target, adm_grpc.AdminStub, api_key=api_key, timeout=timeout, tls=tls
        )

    def _stub(self) -> adm_grpc.AdminStub:
        return self._conn.stub()

    async def _call(
        self, method: Callable[..., Awaitable[R]], request: object, timeout: CallTimeout
    ) -> R:
        try:
            return await method(
                request,
                timeout=resolve_timeout(timeout, self.timeout),
                metadata=self._conn.metadata,
            )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e) from None

    async def list_models(
        self, *, timeout: CallTimeout = USE_CLIENT_DEFAULT
    ) -> list[ModelPlacement]:
        """Every catalog model and every model loaded anywhere, with the replicas holding it."""
        reply = await self._call(self._stub().ListModels, adm.AdminListModelsRequest(), timeout)
        return [convert.placement_from_pb(m) for m in reply.models]

    async def list_replicas(
        self, *, timeout: CallTimeout = USE_CLIENT_DEFAULT
    ) -> list[ReplicaStatus]:
        """Every replica the router knows: state, model, load, device memory."""
        reply = await self._call(self._stub().ListReplicas, adm.ListReplicasRequest(), timeout)
        return [convert.status_from_pb(r) for r in reply.replicas]

    async def load_model(
        self,
        model: str,
        *,
        replicas: int = 0,
        overrides: SpecOverrides | None = None,
        wait: bool = True,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> ModelPlacement:
        """Put a catalog model on at least ``replicas`` replicas (0: the catalog's
        desired_replicas, at least 1), with one-off spec ``overrides``; ``wait``: until they
        are ready (else once the loads started)."""
        request = adm.AdminLoadModelRequest(
            model=model, replicas=replicas, overrides=overrides_to_pb(overrides or {}), wait=wait
        )
        reply = await self._call(self._stub().LoadModel, request, timeout)
        return convert.placement_from_pb(reply)

    async def unload_model(
        self,
        model: str,
        *,
        drain_timeout_s: float = 0.0,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> ModelPlacement:
        """Drain and unload a model from every replica; in-flight requests get
        ``drain_timeout_s`` to finish (0: the router's default)."""
        request = adm.AdminUnloadModelRequest(model=model, drain_timeout_s=drain_timeout_s)
        return convert.placement_from_pb(
            await self._call(self._stub().UnloadModel, request, timeout)
        )

    async def scale_model(
        self,
        model: str,
        replicas: int,
        *,
        drain_timeout_s: float = 0.0,
        wait: bool = True,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> ModelPlacement:
        """Set how many replicas host a model (within the catalog's max_replicas)."""
        request = adm.ScaleModelRequest(
            model=model, replicas=replicas, drain_timeout_s=drain_timeout_s, wait=wait
        )
        return convert.placement_from_pb(
            await self._call(self._stub().ScaleModel, request, timeout)
        )

    async def drain_replica(
        self, replica_id: str, *, timeout: CallTimeout = USE_CLIENT_DEFAULT
    ) -> ReplicaStatus:
        """Stop sending new requests to one replica (it keeps its model)."""
        request = adm.DrainReplicaRequest(replica_id=replica_id)
        return convert.status_from_pb(await self._call(self._stub().DrainReplica, request, timeout))

    async def undrain_replica(
        self, replica_id: str, *, timeout: CallTimeout = USE_CLIENT_DEFAULT
    ) -> ReplicaStatus:
        """Send requests to a drained replica again."""
        request = adm.UndrainReplicaRequest(replica_id=replica_id)
        return convert.status_from_pb(
            await self._call(self._stub().UndrainReplica, request, timeout)
        )

    async def quota_usage(
        self, tenant: str = "", *, timeout: CallTimeout = USE_CLIENT_DEFAULT
    ) -> list[QuotaUsage]:
        """Each limit of ``tenant`` ("": of every tenant) right now."""
        request = adm.GetQuotaUsageRequest(tenant=tenant)
        reply = await self._call(self._stub().GetQuotaUsage, request, timeout)
        return [convert.quota_usage_from_pb(u) for u in reply.usage]


class AdminClient(SyncTwin[AsyncAdminClient]):
    """Blocking client with the same methods as :class:`AsyncAdminClient`."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: TimeoutArg = None,
        tls: ChannelTLS | bool | None = None,
    ) -> None:
        core = AsyncAdminClient(target, api_key=api_key, timeout=timeout, tls=tls)
        super().__init__("meshllm-admin-client", core)

    def list_models(self, *, timeout: CallTimeout = USE_CLIENT_DEFAULT) -> list[ModelPlacement]:
        return self._run(self._async.list_models(timeout=timeout))

    def list_replicas(self, *, timeout: CallTimeout = USE_CLIENT_DEFAULT) -> list[ReplicaStatus]:
        return self._run(self._async.list_replicas(timeout=timeout))

    def load_model(
        self,
        model: str,
        *,
        replicas: int = 0,
        overrides: SpecOverrides | None = None,
        wait: bool = True,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> ModelPlacement:
        return self._run(
            self._async.load_model(
                model, replicas=replicas, overrides=overrides, wait=wait, timeout=timeout
            )
        )

    def unload_model(
        self,
        model: str,
        *,
        drain_timeout_s: float = 0.0,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> ModelPlacement:
        return self._run(
            self._async.unload_model(model, drain_timeout_s=drain_timeout_s, timeout=timeout)
        )

    def scale_model(
        self,
        model: str,
        replicas: int,
        *,
        drain_timeout_s: float = 0.0,
        wait: bool = True,
        timeout: CallTimeout = USE_CLIENT_DEFAULT,
    ) -> ModelPlacement:
        return self._run(
            self._async.scale_model(
                model, replicas, drain_timeout_s=drain_timeout_s, wait=wait, timeout=timeout
            )
        )

    def drain_replica(
        self, replica_id: str, *, timeout: CallTimeout = USE_CLIENT_DEFAULT
    ) -> ReplicaStatus:
        return self._run(self._async.drain_replica(replica_id, timeout=timeout))

    def undrain_replica(
        self, replica_id: str, *, timeout: CallTimeout = USE_CLIENT_DEFAULT
    ) -> ReplicaStatus:
        return self._run(self._async.undrain_replica(replica_id, timeout=timeout))

    def quota_usage(
        self, tenant: str = "", *, timeout: CallTimeout = USE_CLIENT_DEFAULT
    ) -> list[QuotaUsage]:
        return self._run(self._async.quota_usage(tenant, timeout=timeout))
