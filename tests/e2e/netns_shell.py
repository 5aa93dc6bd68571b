"""A shell inside a network namespace of its own, driven over stdin/stdout with JSON lines.

tests/e2e/test_doc_commands.py starts it with ``unshare -rn`` (or ``unshare -n`` as root), so
the commands shown in the docs run exactly as written — ``localhost:50051``, ``--port 50061`` —
without meeting whatever else listens on this machine's loopback.

Requests, one JSON object a line: ``{"op": "run", "cmd": ..., "timeout": s}`` runs a command to
its end; ``{"op": "start", "id": ..., "cmd": ..., "port": n}`` starts a server in the background
and waits until ``port`` accepts connections (or the server exits); ``{"op": "stop", "id": ...}``
stops one (SIGTERM to its process group, then SIGKILL). Each answers one JSON object a line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    """``ip link set lo up`` without needing iproute2: a new namespace's loopback starts down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


class Shell:
    def __init__(self) -> None:
        self.servers: dict[str, tuple[subprocess.Popen[bytes], Any]] = {}

    def run(self, cmd: str, timeout: float) -> dict[str, Any]:
        try:
            done = subprocess.run(
                ["bash", "-c", cmd],
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            shown = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
            return {"rc": None, "output": f"timed out after {timeout} s\n{shown}"}
        return {"rc": done.returncode, "output": done.stdout + done.stderr}

    def start(self, name: str, cmd: str, port: int, timeout: float) -> dict[str, Any]:
        log = tempfile.TemporaryFile()  # noqa: SIM115 - open while the server runs; stop() closes it
        process = subprocess.Popen(
            ["bash", "-c", f"exec {cmd}"], stdout=log, stderr=log, start_new_session=True
        )
        self.servers[name] = (process, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None and not listening(port):
            time.sleep(0.1)
        up = process.poll() is None and listening(port)
        return {"rc": 0 if up else process.poll(), "output": self.log(name)}

    def log(self, name: str) -> str:
        log = self.servers[name][1]
        log.seek(0)
        return str(log.read().decode(errors="replace"))

    def stop(self, name: str) -> dict[str, Any]:
        process, _ = self.servers[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        output = self.log(name)
        self.servers.pop(name)[1].close()
        return {"rc": process.returncode, "output": output}

    def stop_all(self) -> None:
        for name in list(self.servers):
            self.stop(name)


def main() -> None:
    loopback_up()
    shell = Shell()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for line in sys.stdin:
            request = json.loads(line)
            op = request["op"]
            if op == "run":
                answer = shell.run(request["cmd"], request["timeout"])
            elif op == "start":
                answer = shell.start(
                    request["id"], request["cmd"], request["port"], request["timeout"]
                )
            else:
                answer = shell.stop(request["id"])
            print(json.dumps(answer), flush=True)
    finally:
        shell.stop_all()


if __name__ == "__main__":
    main()
