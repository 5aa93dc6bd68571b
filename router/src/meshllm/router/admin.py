"""The operator-facing ``Admin`` service: every call needs an API key with the admin role.

Model placement (list, load, unload, scale, drain) is carried out by ``placement.Placement``;
this layer authenticates, validates the request and converts to and from the wire.
"""

from __future__ import annotations

from typing import Any

import grpc

from meshllm.api.errors import NotFound, invalid_argument
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.router.admission import Admission
from meshllm.router.auth import Authenticator
from meshllm.router.convert import overrides_from_pb, placement_to_pb, usage_to_pb
from meshllm.router.placement.control import Placement
from meshllm.server.serving import unary

Context = grpc.aio.ServicerContext[Any, Any]


def _model(name: str) -> str:
    if not name:
        raise invalid_argument("model", "must name a model (Admin.ListModels shows them)")
    return name


def _replica(name: str) -> str:
    if not name:
        raise invalid_argument("replica_id", "must name a replica (Admin.ListReplicas)")
    return name


class RouterAdminService(adm_grpc.AdminServicer):
    def __init__(self, auth: Authenticator, placement: Placement, admission: Admission) -> None:
        self._auth, self._placement, self._admission = auth, placement, admission

    def _admin(self, context: Context) -> None:
        self._auth.require_admin(self._auth.authenticate(context.invocation_metadata()))

    async def _placements(self, only: str = "") -> list[adm.ModelPlacement]:
        statuses, p = await self._placement.statuses(), self._placement
        loaded = {s.spec.id for s in statuses if s.spec.id and s.state != rc.REPLICA_STATE_EMPTY}
        models = [only] if only else sorted(set(p.catalog) | loaded)
        return [
            placement_to_pb(m, statuses, p.catalog.get(m), p.desired.get(m, 0), p.pending(m))
            for m in models
        ]

    @unary
    async def ListModels(
        self, request: adm.AdminListModelsRequest, context: Context
    ) -> adm.AdminListModelsResponse:
        self._admin(context)
        return adm.AdminListModelsResponse(models=await self._placements())

    @unary
    async def ListReplicas(
        self, request: adm.ListReplicasRequest, context: Context
    ) -> adm.ListReplicasResponse:
        self._admin(context)
        return adm.ListReplicasResponse(replicas=await self._placement.statuses())

    @unary
    async def LoadModel(
        self, request: adm.AdminLoadModelRequest, context: Context
    ) -> adm.ModelPlacement:
        self._admin(context)
        model = _model(request.model)
        if request.overrides.id not in ("", model):
            raise invalid_argument("overrides.id", f"must be empty or {model!r}")
        overrides = overrides_from_pb(request.overrides)
        await self._placement.load(model, request.replicas, overrides, wait=request.wait)
        return (await self._placements(model))[0]

    @unary
    async def UnloadModel(
        self, request: adm.AdminUnloadModelRequest, context: Context
    ) -> adm.ModelPlacement:
        self._admin(context)
        model = _model(request.model)
        await self._placement.unload(model, _drain(request.drain_timeout_s))
        return (await self._placements(model))[0]

    @unary
    async def ScaleModel(
        self, request: adm.ScaleModelRequest, context: Context
    ) -> adm.ModelPlacement:
        self._admin(context)
        model = _model(request.model)
        await self._placement.scale(
            model, request.replicas, _drain(request.drain_timeout_s), wait=request.wait
        )
        return (await self._placements(model))[0]

    @unary
    async def DrainReplica(
        self, request: adm.DrainReplicaRequest, context: Context
    ) -> rc.ReplicaStatus:
        self._admin(context)
        return await self._placement.drain(_replica(request.replica_id))

    @unary
    async def UndrainReplica(
        self, request: adm.UndrainReplicaRequest, context: Context
    ) -> rc.ReplicaStatus:
        self._admin(context)
        return await self._placement.drain(_replica(request.replica_id), undrain=True)

    @unary
    async def GetQuotaUsage(
        self, request: adm.GetQuotaUsageRequest, context: Context
    ) -> adm.GetQuotaUsageResponse:
        self._admin(context)
        tenants = self._auth.tenants
        if request.tenant and request.tenant not in tenants:
            raise NotFound(
                f"unknown tenant {request.tenant!r}; tenants: {', '.join(sorted(tenants))}"
            )
        names = [request.tenant] if request.tenant else sorted(tenants)
        response = adm.GetQuotaUsageResponse()
        for name in names:
            usage = await self._admission.store.usage(name, tenants[name].limits)
            response.usage.extend(usage_to_pb(u) for u in usage)
        return response


def _drain(seconds: float) -> float:
    if seconds < 0:
        raise invalid_argument("drain_timeout_s", "must not be negative (0: the router's default)")
    return seconds
