"""Turning exceptions into gRPC statuses with details, for unary and streaming handlers."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from meshllm.api.errors import Internal, MeshError

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception, what: str) -> None:
    """Abort the call with ``error``'s status; unexpected errors become a logged INTERNAL."""
    if not isinstance(error, MeshError):
        log.exception("%s failed unexpectedly", what, exc_info=error)
        error = Internal(f"internal error in {what} ({type(error).__name__}); see the server log")
    await context.abort_with_status(error.to_status())


def unary(
    fn: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await abort(context, e, fn.__name__)
            raise AssertionError("unreachable: abort raises") from e

    return wrapper


def streaming(
    fn: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await abort(context, e, fn.__name__)

    return wrapper
