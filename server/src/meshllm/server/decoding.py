"""Undecodable requests get INVALID_ARGUMENT, not grpc.aio's UNKNOWN and a traceback per call.

grpc.aio decodes a request with the method's ``request_deserializer`` before any handler runs;
when that raises (invalid UTF-8 in a string field, a truncated or random message) it answers
UNKNOWN "Unexpected DecodeError" and logs a traceback, so any caller, authenticated or not, can
fill the log. Each service is added through :class:`DecodingServer`, which gives every method a
deserializer that never raises (it returns :class:`Undecodable`) and a behaviour that answers
such a request with INVALID_ARGUMENT. The refusals are logged as one short line at most every
``LOG_EVERY_S``, with a count of those not logged.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

log = logging.getLogger(__name__)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class Undecodable:
    """What a request that did not decode becomes: why, for the refusal."""

    method: str
    error: str


class _RefusalLog:
    """At most one line every ``LOG_EVERY_S``, counting the refusals in between."""

    def __init__(self) -> None:
        self._last, self._unlogged = -math.inf, 0

    def note(self, bad: Undecodable) -> None:
        now = time.monotonic()
        if now - self._last < LOG_EVERY_S:
            self._unlogged += 1
            return
        log.warning(
            "undecodable request to %s refused with INVALID_ARGUMENT (%s; %d more since the "
            "last line)",
            bad.method,
            bad.error,
            self._unlogged,
        )
        self._last, self._unlogged = now, 0


_refusals = _RefusalLog()
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _safe(method: str, deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def decode(raw: bytes) -> Any:
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception as e:  # DecodeError, or whatever a deserializer raises on bad bytes
            return Undecodable(method, type(e).__name__)

    return decode


async def refuse(context: grpc.aio.ServicerContext[Any, Any], bad: Undecodable) -> None:
    """Abort the call with INVALID_ARGUMENT (noted in the rate-limited log line)."""
    _refusals.note(bad)
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request is not a valid protobuf message for {bad.method} ({bad.error})",
    )


CHECKS_ITSELF = "_meshllm_refuses_undecodable"
"""Attribute of a behaviour that refuses an ``Undecodable`` request itself (meshllm's
``unary``/``streaming`` handlers): it keeps its place, with no wrapper around each message."""


def _unary_request(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Undecodable):
                await refuse(context, request)
            async for item in behavior(request, context):
                yield item

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await refuse(context, request)
        return await behavior(request, context)

    return call


async def _checked(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            await refuse(context, request)
        yield request


def _stream_request(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def stream(requests: AsyncIterator[Any], context: Any) -> Any:
            async for item in behavior(_checked(requests, context), context):
                yield item

        return stream

    async def call(requests: AsyncIterator[Any], context: Any) -> Any:
        return await behavior(_checked(requests, context), context)

    return call


def checked_handler(method: str, handler: Handler) -> Handler:
    """``handler`` with a deserializer that never raises and a behaviour that refuses what did
    not decode."""
    h: Any = handler
    changes: dict[str, Any] = {"request_deserializer": _safe(method, h.request_deserializer)}
    kind = next(k for k in _KINDS if getattr(h, k) is not None)
    behavior = getattr(h, kind)
    if not getattr(behavior, CHECKS_ITSELF, False):
        wrap = _unary_request if kind.startswith("unary_") else _stream_request
        changes[kind] = wrap(behavior)
    checked: Handler = h._replace(**changes)
    return checked


class _CheckedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._cache: dict[str, Handler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = details.method
        if method not in self._cache:
            found = self._inner.service(details)
            if len(self._cache) > 1024:  # unknown method names must not grow it without bound
                return checked_handler(method, found) if found is not None else None
            self._cache[method] = checked_handler(method, found) if found is not None else None
        return self._cache[method]


class DecodingServer:
    """Stands in for a ``grpc.aio.Server`` in the generated ``add_*Servicer_to_server``
    functions (and for health and reflection): it registers every method with undecodable
    requests refused as INVALID_ARGUMENT."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_CheckedGeneric(h) for h in handlers])

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        checked = {name: checked_handler(f"/{service}/{name}", h) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, checked)


def add_reflection(server: grpc.aio.Server, names: Sequence[str]) -> None:
    """Server reflection for ``names`` on ``server``, refusing undecodable requests too
    (``enable_server_reflection`` picks its servicer by the server's type, so it is added here
    by hand)."""
    from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, DecodingServer(server))
