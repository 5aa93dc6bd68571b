"""Where the replicas are: static addresses, a file re-read periodically, a DNS name re-resolved
periodically (a Kubernetes headless Service lists one address per ready pod)."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

from meshllm.router.config import DiscoveryConfig, valid_address

log = logging.getLogger(__name__)


def join_host_port(host: str, port: int | str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_replicas_file(path: Path) -> set[str]:
    """``host:port`` per line; blank lines and ``#`` comments are skipped, bad lines logged."""
    out = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        address = line.split("#", 1)[0].strip()
        if not address:
            continue
        if valid_address(address):
            out.add(address)
        else:
            log.warning("%s:%d: %r is not host:port; skipped", path, number, address)
    return out


async def resolve(name_port: str) -> set[str]:
    host, _, port = name_port.rpartition(":")
    infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    return {join_host_port(str(info[4][0]), port) for info in infos}


class Discovery:
    """The current replica addresses; a failed lookup keeps that source's last good answer, so a
    DNS hiccup never empties the mesh."""

    def __init__(self, config: DiscoveryConfig) -> None:
        self._config = config
        self._file: set[str] = set()
        self._dns: set[str] = set()

    async def addresses(self) -> set[str]:
        if self._config.replicas_file:
            try:
                self._file = read_replicas_file(Path(self._config.replicas_file))
            except OSError as e:
                log.warning(
                    "cannot read replicas file: %s; keeping %d addresses", e, len(self._file)
                )
        if self._config.dns:
            try:
                self._dns = await resolve(self._config.dns)
            except (OSError, UnicodeError) as e:
                log.warning(
                    "cannot resolve %s: %s; keeping %d addresses",
                    self._config.dns,
                    e,
                    len(self._dns),
                )
        return set(self._config.replicas) | self._file | self._dns

    @property
    def dynamic(self) -> bool:
        return self._config.dynamic
