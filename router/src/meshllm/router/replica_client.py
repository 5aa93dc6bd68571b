"""The router's typed client of one replica: ``ReplicaControl`` in domain types.

Protobuf stops here (and in the forwarder's documented pass-through of generation calls):
placement, admin and the registry see ``ModelSpec``, ``ReplicaStatus`` and ``LoadReport``.
Every failure is a ``MeshError``; a call cut off because the channel was closed (discovery
removed the replica) is ``Cancelled`` with reason ``REPLICA_REMOVED``, never an
``asyncio.CancelledError`` that would also end the task that made the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc

from meshllm.api import convert
from meshllm.api.errors import Cancelled, MeshError, from_rpc_error
from meshllm.api.spec import ModelSpec
from meshllm.api.tls import ChannelTLS, channel
from meshllm.api.types import LoadReport, ModelInfo, ReplicaStatus
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.api.v1 import replica_control_pb2 as rc
from meshllm.api.v1 import replica_control_pb2_grpc as rc_grpc

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly to a replica that restarts; the watcher backs off on its own.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]
REMOVED = "REPLICA_REMOVED"


class ReplicaClient:
    """One channel to one replica. ``generation`` is the raw stub the forwarder relays through."""

    def __init__(self, address: str, tls: ChannelTLS | None, max_message_bytes: int) -> None:
        options = [*CHANNEL_OPTIONS, ("grpc.max_receive_message_length", max_message_bytes)]
        self.address = address
        self.channel = channel(address, tls, options)
        self.generation = gen_grpc.GenerationStub(self.channel)
        self._control = rc_grpc.ReplicaControlStub(self.channel)

    async def load(self, spec: ModelSpec, *, timeout: float) -> ReplicaStatus:
        """Load ``spec`` and wait until it is READY or FAILED (the status says which)."""
        request = rc.LoadModelRequest(spec=convert.spec_to_pb(spec), wait=True)
        return await self._status(self._control.LoadModel(request, timeout=timeout))

    async def unload(self, model: str, *, drain_s: float, timeout: float) -> ReplicaStatus:
        """Drain, then free ``model`` (NotFound when another model, or none, is loaded)."""
        request = rc.UnloadModelRequest(drain_timeout_s=drain_s, model=model)
        return await self._status(self._control.UnloadModel(request, timeout=timeout))

    async def drain(self, *, timeout: float) -> ReplicaStatus:
        return await self._status(self._control.Drain(rc.DrainRequest(), timeout=timeout))

    async def undrain(self, *, timeout: float) -> ReplicaStatus:
        return await self._status(self._control.Undrain(rc.UndrainRequest(), timeout=timeout))

    async def status(self, *, timeout: float) -> ReplicaStatus:
        return await self._status(self._control.GetStatus(rc.GetStatusRequest(), timeout=timeout))

    async def models(self, *, timeout: float) -> list[ModelInfo]:
        call = self.generation.ListModels(gen.ListModelsRequest(), timeout=timeout)
        response: gen.ListModelsResponse = await _call(call)
        return [convert.model_info_from_pb(m) for m in response.models]

    async def watch_load(self, interval_ms: int, silence_s: float) -> AsyncIterator[LoadReport]:
        """The replica's load reports as they come; ends when it closes the stream. A replica
        silent for ``silence_s`` raises ``TimeoutError`` (it may hang without closing)."""
        call = self._control.WatchLoad(rc.WatchLoadRequest(interval_ms=interval_ms))
        try:
            while True:
                async with asyncio.timeout(silence_s):
                    msg = await _call(call.read())
                if msg is grpc.aio.EOF:
                    return
                yield convert.load_report_from_pb(msg)
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()

    async def _status(self, call: Awaitable[rc.ReplicaStatus]) -> ReplicaStatus:
        return convert.status_from_pb(await _call(call))


async def _call(call: Awaitable[T]) -> T:
    """Await one call, its failure as a ``MeshError``. Closing the channel ends its calls with
    ``asyncio.CancelledError``; that is ``Cancelled`` (REPLICA_REMOVED) here, unless the task
    awaiting the call is itself being cancelled."""
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        raise from_rpc_error(e) from None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise Cancelled("the replica was removed", reason=REMOVED) from None


def transport_failure(error: MeshError) -> bool:
    """The replica could not be reached at all (a replica's own UNAVAILABLE carries a reason)."""
    return error.code == grpc.StatusCode.UNAVAILABLE and not error.reason
