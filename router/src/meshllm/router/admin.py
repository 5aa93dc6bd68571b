"""The operator-facing ``Admin`` service: every call needs an API key with the admin role.

Model placement (list, load, unload, scale, drain) is carried out by ``placement.Placement``;
this layer authenticates, validates the request and converts to and from the wire.
"""

from __future__ import annotations

from typing import Any

import grpc

from meshllm.api import convert
from meshllm.api.bounds import MAX_MODEL_CHARS, shown
from meshllm.api.errors import NotFound, invalid_argument
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.router.auth import Authenticator
from meshllm.router.placement.control import Placement
from meshllm.router.quota import QuotaStore
from meshllm.server.serving import unary

Context = grpc.aio.ServicerContext[Any, Any]


def _model(name: str) -> str:
    if not name:
        raise invalid_argument("model", "must name a model (Admin.ListModels shows them)")
    if len(name) > MAX_MODEL_CHARS:
        raise invalid_argument("model", f"is {len(name)} characters; at most {MAX_MODEL_CHARS}")
    return name


def _replica(name: str) -> str:
    if not name:
        raise invalid_argument("replica_id", "must name a replica (Admin.ListReplicas)")
    if len(name) > MAX_MODEL_CHARS:
        why = f"is {len(name)} characters; at most {MAX_MODEL_CHARS}"
        raise invalid_argument("replica_id", why)
    return name


class RouterAdminService(adm_grpc.AdminServicer):
    def __init__(self, auth: Authenticator, placement: Placement, quotas: QuotaStore) -> None:
        self._auth, self._placement, self._quotas = auth, placement, quotas

    def _admin(self, context: Context) -> None:
        self._auth.require_admin(self._auth.authenticate(context.invocation_metadata()))

    async def _one(self, model: str) -> adm.ModelPlacement:
        (placement,) = await self._placement.overview.placements(model)
        return convert.placement_to_pb(placement)

    @unary
    async def ListModels(
        self, request: adm.AdminListModelsRequest, context: Context
    ) -> adm.AdminListModelsResponse:
        self._admin(context)
        placements = await self._placement.overview.placements()
        return adm.AdminListModelsResponse(models=[convert.placement_to_pb(p) for p in placements])

    @unary
    async def ListReplicas(
        self, request: adm.ListReplicasRequest, context: Context
    ) -> adm.ListReplicasResponse:
        self._admin(context)
        statuses = await self._placement.overview.statuses()
        return adm.ListReplicasResponse(replicas=[convert.status_to_pb(s) for s in statuses])

    @unary
    async def LoadModel(
        self, request: adm.AdminLoadModelRequest, context: Context
    ) -> adm.ModelPlacement:
        self._admin(context)
        model = _model(request.model)
        if request.overrides.id not in ("", model):
            raise invalid_argument("overrides.id", f"must be empty or {model!r}")
        overrides = convert.spec_overrides_from_pb(request.overrides)
        await self._placement.load(model, request.replicas, overrides, wait=request.wait)
        return await self._one(model)

    @unary
    async def UnloadModel(
        self, request: adm.AdminUnloadModelRequest, context: Context
    ) -> adm.ModelPlacement:
        self._admin(context)
        model = _model(request.model)
        await self._placement.unload(model, _drain(request.drain_timeout_s))
        return await self._one(model)

    @unary
    async def ScaleModel(
        self, request: adm.ScaleModelRequest, context: Context
    ) -> adm.ModelPlacement:
        self._admin(context)
        model = _model(request.model)
        await self._placement.scale(
            model, request.replicas, _drain(request.drain_timeout_s), wait=request.wait
        )
        return await self._one(model)

    @unary
    async def DrainReplica(
        self, request: adm.DrainReplicaRequest, context: Context
    ) -> rc.ReplicaStatus:
        self._admin(context)
        return convert.status_to_pb(await self._placement.drain(_replica(request.replica_id)))

    @unary
    async def UndrainReplica(
        self, request: adm.UndrainReplicaRequest, context: Context
    ) -> rc.ReplicaStatus:
        self._admin(context)
        status = await self._placement.drain(_replica(request.replica_id), undrain=True)
        return convert.status_to_pb(status)

    @unary
    async def GetQuotaUsage(
        self, request: adm.GetQuotaUsageRequest, context: Context
    ) -> adm.GetQuotaUsageResponse:
        self._admin(context)
        tenants = self._auth.tenants
        if request.tenant and request.tenant not in tenants:
            raise NotFound(
                f"unknown tenant {shown(request.tenant)}; tenants: {', '.join(sorted(tenants))}"
            )
        names = [request.tenant] if request.tenant else sorted(tenants)
        response = adm.GetQuotaUsageResponse()
        for name in names:
            usage = await self._quotas.usage(name, tenants[name].limits)
            response.usage.extend(convert.quota_usage_to_pb(u) for u in usage)
        return response


def _drain(seconds: float) -> float:
    if seconds < 0:
        raise invalid_argument("drain_timeout_s", "must not be negative (0: the router's default)")
    return seconds
