"""The router's OpenAI-compatible HTTP front: aiohttp's server on the router's own event loop,
calling the same forwarder as the gRPC service (one authentication, admission, quota, pick,
failover, metrics, access log and trace per request).

A client that disconnects cancels its handler (``handler_cancellation``), which cancels the
forwarder's call to the replica, as a cancelled gRPC call does. A stream's status line waits for
its first chunk, so everything that fails before it (quota, no replica, a bad field the replica
found) is a plain HTTP error; after it, a failure is an ``error`` event and no ``[DONE]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from meshllm.api.errors import Internal, MeshError, NotFound, invalid_argument
from meshllm.api.tls import ServerTLS
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router.admission import Headers
from meshllm.router.auth import Authenticator
from meshllm.router.config import HttpConfig
from meshllm.router.forward import Forwarder
from meshllm.router.http import replies, requests
from meshllm.router.http.errors import HttpError, error_body, http_error, quota_headers
from meshllm.router.registry import Registry
from meshllm.router.request import Call
from meshllm.router.route_key import SESSION_HEADER
from meshllm.router.service import listed
from meshllm.router.tenants import Tenant

log = logging.getLogger(__name__)
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Parse = Callable[[object, str | None], requests.Parsed]


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _event(body: object) -> bytes:
    return f"data: {_dumps(body)}\n\n".encode()


DONE = b"data: [DONE]\n\n"


class HttpFront:
    """``await start()`` returns the bound port; ``await stop(grace_s)`` lets requests finish."""

    def __init__(
        self,
        *,
        forwarder: Forwarder,
        registry: Registry,
        auth: Authenticator,
        config: HttpConfig,
        host: str,
        grace_s: float,
        tls: ServerTLS | None = None,
    ) -> None:
        self._forwarder, self._registry, self._auth = forwarder, registry, auth
        self._config, self._host, self._grace_s, self._tls = config, host, grace_s, tls
        self._runner: web.AppRunner | None = None
        self._stopping = False

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_body_bytes, middlewares=[_errors])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/health/ready", self.ready)
        app.on_response_prepare.append(_server_header)
        return app

    async def start(self) -> int:
        # no aiohttp access log: it would write client-sent text; the router's own line is logged
        self._runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=self._grace_s
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self._host,
            self._config.port or 0,
            backlog=1024,
            reuse_port=False,
            ssl_context=_ssl_context(self._tls),
        )
        await site.start()
        port: int = self._runner.addresses[0][1]
        return port

    async def stop(self) -> None:
        """Refuse new connections; requests under way get the drain grace to finish."""
        self._stopping = True
        if self._runner is not None:
            await self._runner.cleanup()

    # -- generation ------------------------------------------------------------------------

    async def chat_completions(self, http: web.Request) -> web.StreamResponse:
        return await self._generate(http, requests.chat, chat=True)

    async def completions(self, http: web.Request) -> web.StreamResponse:
        return await self._generate(http, requests.completion, chat=False)

    async def _generate(self, http: web.Request, parse: Parse, *, chat: bool) -> web.StreamResponse:
        created = int(time.time())
        tenant: Tenant | None = None
        try:
            tenant = self._tenant(http)
            parsed = parse(await _body(http), requests.request_id(http.headers.get("X-Request-Id")))
        except MeshError as e:
            return _reply(http_error(e, tenant.limits if tenant else None))
        headers: dict[str, str] = {}
        call = self._call(http, tenant, headers, parsed.session)
        if parsed.stream:
            return await self._stream(
                http, parsed=parsed, call=call, headers=headers, chat=chat, created=created
            )
        try:
            response = await self._forwarder.generate(parsed.request, call)
            reply = replies.Reply(chat, response.request_id, response.model, created)
            body = reply.whole(response)
        except Exception as e:
            return _reply(http_error(_mesh(e), tenant.limits))
        return _json(body, headers={**headers, "x-request-id": response.request_id})

    async def _stream(
        self,
        http: web.Request,
        *,
        parsed: requests.Parsed,
        call: Call,
        headers: dict[str, str],
        chat: bool,
        created: int,
    ) -> web.StreamResponse:
        stream: web.StreamResponse | None = None
        chunks = self._forwarder.stream(parsed.request, call)
        try:
            events = self._events(chunks, parsed, chat, created)
            async with contextlib.aclosing(chunks), contextlib.aclosing(events):
                async for event in events:
                    if stream is None:
                        stream = await _open_stream(http, headers, parsed.request.request_id)
                    await stream.write(event)
        except ConnectionResetError:  # the client left between two writes: nothing to tell
            pass
        except Exception as e:
            error = http_error(_mesh(e), call.tenant.limits)
            if stream is None:
                return _reply(error)
            with contextlib.suppress(ConnectionResetError):
                await stream.write(_event(error.body))  # no [DONE]: the reply is incomplete
        return stream if stream is not None else web.Response(status=499)

    async def _events(
        self,
        chunks: AsyncIterator[gen.GenerateChunk],
        parsed: requests.Parsed,
        chat: bool,
        created: int,
    ) -> AsyncGenerator[bytes]:
        reply: replies.Reply | None = None
        last: gen.GenerateChunk | None = None
        # Read ``chunks`` to its end (the forwarder stops after the final chunk): leaving it
        # early would close it, and the request would be recorded as cancelled.
        async for chunk in chunks:
            first = reply is None
            if reply is None:
                model = chunk.model or parsed.request.model
                reply = replies.Reply(chat, parsed.request.request_id, model, created)
            yield _event(reply.chunk(chunk, first=first, include_usage=parsed.include_usage))
            last = chunk
        if reply is not None and last is not None:  # the forwarder raises on a cut-short reply
            if parsed.include_usage:
                yield _event(reply.usage_chunk(last.usage))
            yield DONE

    def _tenant(self, http: web.Request) -> Tenant:
        key = http.headers.get("Authorization")
        if key is not None and not key.isprintable():  # undecodable bytes arrive as surrogates
            key = "malformed"
        return self._auth.authenticate([("authorization", key)] if key is not None else [])

    def _call(
        self, http: web.Request, tenant: Tenant, headers: dict[str, str], session: str = ""
    ) -> Call:
        """The request as the forwarder sees a gRPC call: tenant, deadline, trace context, the
        session key (the header, else the body's ``prompt_cache_key``), and quota headers kept
        for the reply's status line."""
        deadline = time.monotonic() + self._config.timeout_s
        metadata = [(k, v) for k in TRACE_HEADERS if (v := http.headers.get(k)) is not None]
        if session := http.headers.get(SESSION_HEADER, session):
            metadata.append((SESSION_HEADER, session))

        async def keep_headers(quota: Headers) -> None:
            headers.update(quota_headers(quota))

        return Call(
            tenant,
            lambda: deadline - time.monotonic(),
            grpc.aio.Metadata(*metadata),
            keep_headers,
        )

    # -- models and health -----------------------------------------------------------------

    async def models(self, http: web.Request) -> web.StreamResponse:
        try:
            self._tenant(http)
        except MeshError as e:
            return _reply(http_error(e))
        ready = self._registry.ready_models()
        data = [replies.model(listed(m, ready[m])) for m in sorted(ready)]
        return _json({"object": "list", "data": data})

    async def model(self, http: web.Request) -> web.StreamResponse:
        name = http.match_info["model"]
        try:
            self._tenant(http)
            replicas = self._registry.ready_models().get(name)
            if not replicas:
                raise NotFound(
                    f"model {name[:200]!r} is not served now (GET /v1/models lists those that are)"
                )
        except MeshError as e:
            return _reply(http_error(e))
        return _json(replies.model(listed(name, replicas)))

    async def health(self, http: web.Request) -> web.StreamResponse:
        """Liveness: 200 while the router runs (also with no replica yet), 503 once stopping."""
        if self._stopping:
            return _json({"status": "stopping"}, status=503)
        return _json({"status": "ok", "ready_models": len(self._registry.ready_models())})

    async def ready(self, http: web.Request) -> web.StreamResponse:
        """Readiness: 200 while some model has a replica that takes work."""
        ready = 0 if self._stopping else len(self._registry.ready_models())
        return _json(
            {"status": "ok" if ready else "no ready model", "ready_models": ready},
            status=200 if ready else 503,
        )


def _ssl_context(tls: ServerTLS | None) -> ssl.SSLContext | None:
    """The gRPC port's TLS (and mutual TLS) for the HTTP port too: never plaintext beside it."""
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    if tls.mutual:
        context.load_verify_locations(tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def _body(http: web.Request) -> Any:
    raw = await http.read()
    try:
        body = json.loads(raw)
        # JSON's \ud800-style escapes can spell lone surrogates, which protobuf strings refuse
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise invalid_argument("body", "holds a string that is not valid Unicode") from None
    except (ValueError, RecursionError):
        raise invalid_argument("body", "is not valid JSON (UTF-8)") from None
    return body


async def _open_stream(
    http: web.Request, headers: dict[str, str], request_id: str
) -> web.StreamResponse:
    stream = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "x-request-id": request_id,
            **headers,
        }
    )
    await stream.prepare(http)
    return stream


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "meshllm"  # not aiohttp's default, which names its version


def _mesh(error: Exception) -> MeshError:
    if isinstance(error, MeshError):
        return error
    log.exception("HTTP request failed unexpectedly", exc_info=error)
    return Internal(f"internal error ({type(error).__name__}); see the router's log")


def _reply(error: HttpError) -> web.Response:
    return _json(error.body, status=error.status, headers=dict(error.headers))


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path, wrong method, body too large) in OpenAI's shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        message = f"{e.reason}: {request.method} {request.path[:200]}"
        if e.status == 413:
            message = f"request body larger than {request.client_max_size} bytes"
        return _json(error_body(message, kind, None, None), status=e.status)
