"""The operator-facing ``Admin`` service: every call needs an API key with the admin role.

This holds replica listing and quota usage; model load control (load, unload, scale, drain)
arrives with the model catalog and answers UNIMPLEMENTED until then.
"""

from __future__ import annotations

from typing import Any

import grpc

from meshllm.api.errors import NotFound
from meshllm.api.serving import unary
from meshllm.api.v1 import admin_pb2 as adm
from meshllm.api.v1 import admin_pb2_grpc as adm_grpc
from meshllm.router.admission import Admission
from meshllm.router.auth import Authenticator
from meshllm.router.convert import replica_status_to_pb, usage_to_pb
from meshllm.router.registry import Registry

Context = grpc.aio.ServicerContext[Any, Any]


class RouterAdminService(adm_grpc.AdminServicer):
    def __init__(self, auth: Authenticator, registry: Registry, admission: Admission) -> None:
        self._auth, self._registry, self._admission = auth, registry, admission

    def _admin(self, context: Context) -> None:
        self._auth.require_admin(self._auth.authenticate(context.invocation_metadata()))

    @unary
    async def ListReplicas(
        self, request: adm.ListReplicasRequest, context: Context
    ) -> adm.ListReplicasResponse:
        self._admin(context)
        replicas = sorted(self._registry.replicas.values(), key=lambda r: r.name)
        return adm.ListReplicasResponse(replicas=[replica_status_to_pb(r) for r in replicas])

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
