"""Native memory of a grpc.aio relay per client-cancelled stream (issue 19 item 11).

The router was seen to grow ~180 KB of resident memory per 1,000 streams its clients cancel,
with a flat Python heap. This script finds where that comes from on the installed grpcio, with
a bare relay that needs nothing but grpcio and psutil (raw-bytes generic handlers, no generated
code), so it also runs in a venv holding another grpcio version:

    python benchmarks/cancel_memory.py --out cancel_memory.json

A backend streams a 32-byte message every millisecond until cancelled; a relay forwards it (an
async-generator handler calling the backend, ``call.cancel()`` upstream in ``finally``, as the
router's forwarder does). The client opens a stream through the relay, reads one message and
cancels, 16 at a time. The relay's RSS is sampled after a warm-up and after each round, and the
slope (least squares) is reported in KB per 1,000 streams, for these cases:

- ``cancel``: the client cancels after the first message (the case seen);
- ``complete``: the backend sends 3 messages and ends; nothing is cancelled (the control);
- ``cancel-write``: as ``cancel``, the relay handler using ``context.write`` instead of yield;
- ``cancel-deadline``: the client sets a 20 ms deadline instead of cancelling;
- ``cancel-trim``: as ``cancel``, the relay calling glibc ``malloc_trim(0)`` before each sample
  (what of the growth is memory freed but kept by the allocator);
- ``cancel-fresh-channel``: as ``cancel``, each round through a new client channel (a new
  connection), the old one closed (what of it is held per connection);
- ``cancel-no-relay``: the client cancels streams of the backend itself, whose RSS is sampled
  (the server side of a cancel alone, without the relay's upstream client call);
- ``cancel-no-upstream-cancel``: as ``cancel``, the relay never calls ``cancel()`` on the
  upstream call (dropping it ends it);
- ``cancel-recycle-upstream``: as ``cancel``, the relay opens a new upstream channel every 2,000
  streams and closes the old one once its calls ended (what of it the upstream channel holds);
- ``router``: the meshllm router itself (``--no-auth``) in front of a meshllm replica (``fake``
  engine, a token a millisecond), the router's RSS sampled (needs this repository installed).

Each case runs in fresh processes. The JSON holds every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil

METHOD = "/bench.Relay/Stream"
ROUTER_METHOD = "/meshllm.api.v1.Generation/GenerateStream"
CASES = (
    "cancel",
    "complete",
    "cancel-write",
    "cancel-deadline",
    "cancel-trim",
    "cancel-fresh-channel",
    "cancel-no-relay",
    "cancel-no-upstream-cancel",
    "cancel-recycle-upstream",
    "router",
)
RECYCLE_EVERY = 2000
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _identity(b: bytes) -> bytes:
    return b


# -- servers (child processes) --------------------------------------------------------------------


async def serve_backend(port: int, messages: int) -> None:
    async def stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> Any:
        sent = 0
        while messages == 0 or sent < messages:
            yield b"x" * 32
            sent += 1
            await asyncio.sleep(0.001)

    await _serve(port, stream)


async def serve_relay(port: int, backend: int, case: str) -> None:
    target = f"127.0.0.1:{backend}"
    channel = grpc.aio.insecure_channel(target)
    served = 0

    def upstream(request: bytes) -> Any:
        nonlocal channel, served
        served += 1
        if case == "cancel-recycle-upstream" and served % RECYCLE_EVERY == 0:
            old, channel = channel, grpc.aio.insecure_channel(target)
            asyncio.get_running_loop().create_task(old.close(grace=5.0))
        stub = channel.unary_stream(
            METHOD, request_serializer=_identity, response_deserializer=_identity
        )
        return stub(request)

    async def relay_yield(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> Any:
        call = upstream(request)
        try:
            async for message in call:
                yield message
        finally:
            if case != "cancel-no-upstream-cancel":
                call.cancel()

    async def relay_write(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        call = upstream(request)
        try:
            async for message in call:
                await context.write(message)
        finally:
            call.cancel()

    if case == "cancel-trim" and _LIBC is not None:
        # the parent sends SIGUSR1 before each sample
        signal.signal(signal.SIGUSR1, lambda *_: _LIBC.malloc_trim(0))
    await _serve(port, relay_write if case == "cancel-write" else relay_yield)


async def _serve(port: int, handler: Any) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "bench.Relay",
                {
                    "Stream": grpc.unary_stream_rpc_method_handler(
                        handler, request_deserializer=_identity, response_serializer=_identity
                    )
                },
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- the measuring parent -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(*args: str, module: str = "") -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if module:
        cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args]
    else:
        cmd = [sys.executable, __file__, "--serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"server {args} did not start")
        time.sleep(0.05)


def request_bytes(case: str) -> bytes:
    if case != "router":
        return b"go"
    from meshllm.api.v1 import generation_pb2 as gen  # only this case needs the repository

    # 2 s of tokens (a millisecond each, the fake engine's): every stream is cancelled first
    request = gen.GenerateRequest(model="demo", prompt="go", max_tokens=2000)
    return request.SerializeToString()


async def one_stream(stub: Any, case: str, request: bytes) -> None:
    if case == "cancel-deadline":
        call = stub(request, timeout=0.02)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
        return
    call = stub(request)
    if case == "complete":
        async for _ in call:
            pass
        return
    await call.read()
    call.cancel()


async def drive(port: int, case: str, streams: int, concurrency: int, channel: Any) -> Any:
    if channel is None or case == "cancel-fresh-channel":
        if channel is not None:
            await channel.close()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    method = ROUTER_METHOD if case == "router" else METHOD
    stub = channel.unary_stream(
        method, request_serializer=_identity, response_deserializer=_identity
    )
    queue, request = iter(range(streams)), request_bytes(case)

    async def worker() -> None:
        for _ in queue:
            await one_stream(stub, case, request)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return channel


def rss_kb(proc: psutil.Process, trim: bool) -> float:
    if trim:
        proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)  # let cancelled calls finish their cleanup
    return float(proc.memory_info().rss) / 1024


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares KB per 1,000 streams."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return 1000 * sxy / sxx if sxx else 0.0


def start_pair(case: str) -> tuple[subprocess.Popen[bytes], int, subprocess.Popen[bytes], int]:
    """The backend and the relay in front of it."""
    if case == "router":
        backend, backend_port = start(
            *("--model", "demo", "--engine", "fake", "--option", "token_delay_ms=1"),
            *("--log-level", "WARNING"),
            module="meshllm.replica",
        )
        relay, relay_port = start(
            *("--replica", f"127.0.0.1:{backend_port}", "--no-auth", "--log-level", "WARNING"),
            module="meshllm.router",
        )
        return backend, backend_port, relay, relay_port
    backend, backend_port = start("backend", "--messages", "3" if case == "complete" else "0")
    relay, relay_port = start("relay", "--backend", str(backend_port), "--case", case)
    return backend, backend_port, relay, relay_port


async def until_served(port: int, case: str, timeout_s: float = 120.0) -> None:
    """The first stream that gets a message (the router waits for its replica's model)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await drive(port, case, 1, 1, None)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def measure(case: str, rounds: int, per_round: int, warmup: int) -> dict[str, Any]:
    backend, backend_port, relay, relay_port = start_pair(case)
    trim = case == "cancel-trim"
    sampled, target = (backend, backend_port) if case == "cancel-no-relay" else (relay, relay_port)
    try:
        proc = psutil.Process(sampled.pid)
        await until_served(target, case)
        channel = await drive(target, case, warmup, 16, None)
        points = [(0, rss_kb(proc, trim))]
        started = time.perf_counter()
        for r in range(1, rounds + 1):
            channel = await drive(target, case, per_round, 16, channel)
            points.append((r * per_round, rss_kb(proc, trim)))
        elapsed = time.perf_counter() - started
        await channel.close()
        closed = rss_kb(proc, trim)
    finally:
        for p in (relay, backend):
            p.kill()
            p.wait()
    result = {
        "case": case,
        "kb_per_1000_streams": round(slope(points), 1),
        "rss_kb": points,
        "rss_kb_after_closing_the_client_channel": closed,
        "streams_per_second": round(rounds * per_round / elapsed, 1),
    }
    print(
        f"{case:22s} {result['kb_per_1000_streams']:7.1f} KB per 1,000 streams "
        f"(RSS {points[0][1] / 1024:.1f} -> {points[-1][1] / 1024:.1f} MB over "
        f"{rounds * per_round} streams; {closed / 1024:.1f} MB after the client channel closed)",
        flush=True,
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", choices=("backend", "relay"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    p.add_argument("--messages", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--case", default="cancel", help=argparse.SUPPRESS)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated cases to run")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=4000, help="streams per round")
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args()
    if args.serve == "backend":
        asyncio.run(serve_backend(args.port, args.messages))
        return
    if args.serve == "relay":
        asyncio.run(serve_relay(args.port, args.backend, args.case))
        return
    print(f"grpcio {grpc.__version__}, Python {platform.python_version()}", flush=True)
    results = [
        asyncio.run(measure(case, args.rounds, args.per_round, args.warmup))
        for case in args.cases.split(",")
    ]
    report = {
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "per_round": args.per_round,
        "results": results,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
