"""Ending the attempts on a replica the router ejected, instead of waiting on a process that may
hang (SIGSTOP, a stuck host) until TCP or keepalive notice, which takes a minute or more.

An attempt that has received nothing yet ends at the ejection: another replica can take the
request. One already under way ends once it too has been silent for ``quiet_s`` after it: a
replica ejected for a late load report may still be streaming, and its streams go on.
"""

from __future__ import annotations

import asyncio

import grpc

from meshllm.router.registry import Replica


class EjectionWatch:
    """Watches one attempt's replica; when it fires, it cancels the call, and ``fired`` tells
    the attempt that the ``CancelledError`` that follows is this, not its caller's cancel."""

    def __init__(self, replica: Replica, call: grpc.aio.Call, quiet_s: float) -> None:
        self._replica, self._call, self._quiet_s = replica, call, quiet_s
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self.started = False
        """The replica sent a chunk of this reply."""
        self.fired = False
        self._last = self._loop.time()
        replica.on_eject.add(self._ejected)

    def progress(self) -> None:
        """A chunk came."""
        self.started, self._last = True, self._loop.time()

    @property
    def why(self) -> str:
        return self._replica.last_error or "ejected"

    def _ejected(self) -> None:
        if not self.started:
            self._fire()
        elif self._timer is None:
            self._check()

    def _check(self) -> None:
        self._timer = None
        due = self._last + self._quiet_s
        if self._loop.time() >= due:
            self._fire()
        else:
            self._timer = self._loop.call_at(due, self._check)

    def _fire(self) -> None:
        self.fired = True
        self._call.cancel()

    def close(self) -> None:
        self._replica.on_eject.discard(self._ejected)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
