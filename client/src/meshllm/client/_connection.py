"""What every client shares: one lazily opened channel and its stub, the caller's key as call
metadata, the client's default deadline; and the blocking twin's plumbing around an async client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, Self, TypeVar

import grpc

from meshllm.api.tls import ChannelTLS, channel
from meshllm.client._loop import BackgroundLoop
from meshllm.client._options import Timeout, TimeoutArg, as_timeout

S = TypeVar("S")


class Connection(Generic[S]):
    """``stub()`` opens the channel on first use; ``close()`` closes it (a later call reopens).

    A grpc.aio channel belongs to the event loop it was opened on: a client used again under a
    new loop (a second ``asyncio.run``, a notebook cell after another) gets a new channel, and
    the old one, whose loop has ended, is dropped (it cannot be closed from another loop)."""

    def __init__(
        self,
        target: str,
        make_stub: Callable[[grpc.aio.Channel], S],
        *,
        api_key: str | None,
        timeout: TimeoutArg,
        tls: ChannelTLS | bool | None,
    ) -> None:
        self.target = target
        self.timeout = as_timeout(timeout)
        self.tls = ChannelTLS() if tls is True else tls or None
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self._make_stub = make_stub
        self._channel: grpc.aio.Channel | None = None
        self._stub: S | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def stub(self) -> S:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            self._channel = channel(self.target, self.tls)
            self._stub, self._loop = self._make_stub(self._channel), loop
        return self._stub

    async def close(self) -> None:
        if self._channel is not None and self._loop is asyncio.get_running_loop():
            await self._channel.close()
        self._channel = self._stub = self._loop = None


class Connected(Generic[S]):
    """An async client over one ``Connection``: its settings, ``async with`` and ``close``."""

    _conn: Connection[S]

    @property
    def target(self) -> str:
        return self._conn.target

    @property
    def timeout(self) -> Timeout:
        """Every call's deadline unless the call gives its own."""
        return self._conn.timeout

    @property
    def tls(self) -> ChannelTLS | None:
        return self._conn.tls

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._conn.close()


class AsyncCore(Protocol):
    @property
    def target(self) -> str: ...

    @property
    def timeout(self) -> Timeout: ...

    async def close(self) -> None: ...


A = TypeVar("A", bound=AsyncCore)
T = TypeVar("T")


class SyncTwin(Generic[A]):
    """A blocking client over an async one: each call runs on a private background loop."""

    def __init__(self, name: str, core: A) -> None:
        self._loop = BackgroundLoop(name)
        self._async = core

    @property
    def target(self) -> str:
        return self._async.target

    @property
    def timeout(self) -> Timeout:
        """Every call's deadline unless the call gives its own."""
        return self._async.timeout

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.close(self._async.close())

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(call)
