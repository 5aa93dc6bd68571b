"""Why the router's HTTP front runs on aiohttp: the same SSE endpoint on aiohttp's server and on
Starlette under uvicorn (with httptools, its fastest parser), measured from one client process.

Each server is its own process serving ``POST /stream`` (a JSON body in, ``EVENTS`` SSE events
out, like a chat completion stream) and ``POST /json`` (one small JSON reply). The client (aiohttp)
measures the round trip of ``/json`` at concurrency 1 (p50, microseconds) and the events per second
of ``/stream`` at concurrency 32. Starlette and uvicorn are not meshllm dependencies: run this in a
scratch venv::

    python3.11 -m venv /tmp/stacks && /tmp/stacks/bin/pip install aiohttp starlette uvicorn httptools
    /tmp/stacks/bin/python benchmarks/http_stacks.py --json /tmp/http_stacks.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import time
from typing import Any

EVENTS = 64
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(EVENTS):
            await response.write(EVENT)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def small(request: web.Request) -> web.Response:
        await request.json()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/stream", stream)
    app.router.add_post("/json", small)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_starlette(port: int) -> None:
    import uvicorn  # type: ignore[import-not-found, unused-ignore]
    from starlette.applications import Starlette  # type: ignore[import-not-found, unused-ignore]
    from starlette.requests import Request  # type: ignore[import-not-found, unused-ignore]
    from starlette.responses import (  # type: ignore[import-not-found, unused-ignore]
        JSONResponse,
        StreamingResponse,
    )
    from starlette.routing import Route  # type: ignore[import-not-found, unused-ignore]

    async def stream(request: Request) -> StreamingResponse:
        await request.json()

        async def events() -> Any:
            for _ in range(EVENTS):
                yield EVENT
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def small(request: Request) -> JSONResponse:
        await request.json()
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/stream", stream, methods=["POST"]), Route("/json", small, methods=["POST"])]
    )
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="error", http="httptools", access_log=False
    )


async def measure(port: int, requests: int, concurrency: int) -> dict[str, float]:
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(50):  # ready and warm
            try:
                async with session.post(f"{base}/json", json={"x": 1}) as r:
                    await r.read()
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        rtts = []
        for _ in range(requests):
            t0 = time.perf_counter()
            async with session.post(f"{base}/json", json={"model": "m", "x": 1}) as r:
                await r.read()
            rtts.append((time.perf_counter() - t0) * 1e6)
        window = asyncio.Semaphore(concurrency)

        async def one() -> int:
            async with window, session.post(f"{base}/stream", json={"stream": True}) as r:
                n = 0
                async for line in r.content:
                    n += line.startswith(b"data:")
                return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(requests)))
        elapsed = time.perf_counter() - t0
    return {
        "json_rtt_p50_us": statistics.median(rtts),
        "stream_events_per_s": sum(counts) / elapsed,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args()
    results: dict[str, dict[str, float]] = {}
    for name, target in (("aiohttp", serve_aiohttp), ("starlette+uvicorn", serve_starlette)):
        port = _free_port()
        proc = multiprocessing.Process(target=target, args=(port,), daemon=True)
        proc.start()
        try:
            results[name] = asyncio.run(measure(port, args.requests, 32))
        finally:
            proc.terminate()
            proc.join()
        print(f"{name:18s} " + "  ".join(f"{k} {v:,.0f}" for k, v in results[name].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
