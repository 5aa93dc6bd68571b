"""The internal ``ReplicaControl`` service: load, unload, status and load reports."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc

from meshllm.api.convert import load_report_to_pb, spec_from_pb, status_to_pb
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.api.v1 import replica_control_pb2_grpc as rc_grpc
from meshllm.replica.host import Replica
from meshllm.server.serving import streaming, unary

Context = grpc.aio.ServicerContext[Any, Any]


class ReplicaControlService(rc_grpc.ReplicaControlServicer):
    def __init__(self, replica: Replica) -> None:
        self._replica = replica

    def _status(self) -> rc.ReplicaStatus:
        return status_to_pb(self._replica.status())

    @unary
    async def LoadModel(self, request: rc.LoadModelRequest, context: Context) -> rc.ReplicaStatus:
        await self._replica.load(spec_from_pb(request.spec), wait=request.wait)
        return self._status()

    @unary
    async def UnloadModel(
        self, request: rc.UnloadModelRequest, context: Context
    ) -> rc.ReplicaStatus:
        await self._replica.unload(drain_timeout_s=request.drain_timeout_s, model=request.model)
        return self._status()

    @unary
    async def GetStatus(self, request: rc.GetStatusRequest, context: Context) -> rc.ReplicaStatus:
        return self._status()

    @unary
    async def Drain(self, request: rc.DrainRequest, context: Context) -> rc.ReplicaStatus:
        await self._replica.drain()
        return self._status()

    @unary
    async def Undrain(self, request: rc.UndrainRequest, context: Context) -> rc.ReplicaStatus:
        await self._replica.undrain()
        return self._status()

    @streaming
    async def WatchLoad(
        self, request: rc.WatchLoadRequest, context: Context
    ) -> AsyncGenerator[rc.LoadReport]:
        interval = (request.interval_ms or self._replica.config.report_interval_ms) / 1000.0
        seen = self._replica.state_changes
        while True:
            yield load_report_to_pb(self._replica.load_report())
            seen = await self._replica.wait_change(interval, since=seen)
