"""Server-side helpers shared by the router and the replica: handlers that turn exceptions into
gRPC statuses with details, and the channel options every meshllm server uses."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import signal
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc

from meshllm.api.bounds import bounded
from meshllm.api.errors import Internal, MeshError
from meshllm.api.tls import ServerTLS
from meshllm.server.decoding import CHECKS_ITSELF, Undecodable, refuse
from meshllm.server.logs import setup_logging
from meshllm.server.tracing import configure_from_env

if TYPE_CHECKING:
    from grpc_health.v1._async import HealthServicer

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")
C = TypeVar("C")


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: Exception, what: str) -> None:
    """Abort the call with ``error``'s status; unexpected errors become a logged INTERNAL."""
    if not isinstance(error, MeshError):
        log.exception("%s failed unexpectedly", what, exc_info=error)
        error = Internal(f"internal error in {what} ({type(error).__name__}); see the server log")
    error.message = bounded(error.message)  # a status must fit gRPC's metadata limit
    await context.abort_with_status(error.to_status())


def unary(
    fn: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        if isinstance(request, Undecodable):
            await refuse(context, request)
        try:
            return await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await abort(context, e, fn.__name__)
            raise AssertionError("unreachable: abort raises") from e

    setattr(wrapper, CHECKS_ITSELF, True)
    return wrapper


def streaming(
    fn: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncGenerator[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncGenerator[Resp]]:
    @functools.wraps(fn)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncGenerator[Resp]:
        if isinstance(request, Undecodable):
            await refuse(context, request)
        try:
            # aclosing: a cancelled stream runs the handler's cleanup now, not at garbage collection.
            async with contextlib.aclosing(fn(self, request, context)) as items:
                async for item in items:
                    yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await abort(context, e, fn.__name__)

    setattr(wrapper, CHECKS_ITSELF, True)
    return wrapper


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Options of every meshllm gRPC server."""
    return [
        ("grpc.so_reuseport", 0),  # on by default: a second server would silently share the port
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def listen(server: grpc.aio.Server, host: str, port: int, tls: ServerTLS | None = None) -> int:
    """Bind ``host:port`` (0: a free port) and return the port; a clear OSError if taken.
    With ``tls`` the port speaks TLS (mutual TLS when it has a client CA)."""
    address = f"{host}:{port}"
    try:
        if tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, tls.server_credentials())
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address}: {e}") from e


async def start_health_port(
    host: str, port: int, health: HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server on ``host:port`` (0: a free port) with only ``grpc.health.v1`` (the
    process's own servicer, so both ports report the same statuses) and reflection naming only
    it. Kubelet gRPC probes cannot speak TLS; with TLS on the main port they probe this one. It
    carries serving status only, no model or request data. (Servers only: the imports are the
    router's and the replica's dependencies, not this package's.)"""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from meshllm.server.decoding import DecodingServer, add_reflection

    server = grpc.aio.server(options=server_options(64 * 1024))
    health_pb2_grpc.add_HealthServicer_to_server(health, DecodingServer(server))
    name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    add_reflection(server, (name, reflection.SERVICE_NAME))
    bound = listen(server, host, port)
    await server.start()
    return server, bound


class Server(Protocol):
    async def start(self) -> int: ...
    async def stop(self, grace_s: float | None = None) -> None: ...


async def serve_until_signal(server: Server, what: str) -> None:
    """Start ``server``, run until SIGTERM or SIGINT, then stop it (each server drains its own way)."""
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: %s", what)
    await server.stop()


def distribution_version(name: str) -> str:
    """``--version``'s text: the installed distribution's version."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def run_command(
    prog: str,
    log_level: str,
    log_format: str,
    make_config: Callable[[], C],
    serve: Callable[[C], Coroutine[Any, Any, None]],
) -> None:
    """The body of a server command: logging, config, serve. A bad setting, found in the config
    or only once used (a tenants file's contents), is one line naming it and exit status 2, as
    argparse's usage errors; a port that cannot be bound is one line and status 1."""
    setup_logging(log_level, log_format)
    configure_from_env(prog)
    try:
        config = make_config()
        asyncio.run(serve(config))
    except MeshError as e:
        print(f"{prog}: {e.message}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        sys.exit(f"{prog}: {e}")
