"""One request through the router: its server span, metrics record and quota reservation, begun
and ended together, with one status.

Part of the forwarder's pass-through: it reads the ``GenerateRequest`` and reply messages as
they are, since the router relays them unchanged."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from meshllm.api.bounds import identity_violations
from meshllm.api.errors import FieldViolation, invalid_fields
from meshllm.api.spec import DEFAULT_MAX_TOKENS
from meshllm.api.tracing import (
    end_with_error,
    extract,
    finish_reason_name,
    generation_attributes,
    rpc_attributes,
    tracer,
    usage_attributes,
)
from meshllm.api.types import prompt_tokens_estimate
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router.admission import Admission, Headers
from meshllm.router.metrics import RouterMetrics
from meshllm.router.registry import ServedModel
from meshllm.router.route_key import (
    MAX_PREFIX_TOKENS,
    NO_KEY,
    SESSION_HEADER,
    RouteKey,
    prompt_prefix,
    session_violation,
)
from meshllm.router.tenants import Tenant
from meshllm.server.metrics import RequestRecord

TimeRemaining = Callable[[], float | None]


@dataclass(frozen=True)
class Call:
    """What the service layer knows of one incoming call."""

    tenant: Tenant
    time_remaining: TimeRemaining
    metadata: grpc.aio.Metadata | None
    send_headers: Callable[[Headers], Awaitable[None]]
    """Sends the initial metadata (quota left) before the first reply message."""


def budget(request: gen.GenerateRequest, served: ServedModel | None) -> int:
    """Tokens the request may generate: its max_tokens, else the default of the model ``served``
    (as a replica reported it)."""
    if request.HasField("max_tokens"):
        return request.max_tokens
    return served.spec.max_tokens_default if served is not None else DEFAULT_MAX_TOKENS


def prompt_estimate(request: gen.GenerateRequest) -> int:
    messages = ((m.role, m.content) for m in request.messages)
    return prompt_tokens_estimate(
        prompt=request.prompt,
        messages=messages,
        instructions=request.instructions,
        token_ids=len(request.token_ids),
    )


@dataclass
class RoutedRequest:
    """The counts of one request as its reply passes through; they settle its quota."""

    request: gen.GenerateRequest
    record: RequestRecord
    span: trace.Span
    prompt_estimate: int
    route: RouteKey = NO_KEY
    """What the routing policy sees of it (``route_key``)."""

    def streamed(self, chunk: gen.GenerateChunk) -> None:
        self.record.tokens(len(chunk.token_ids))
        if chunk.finish_reason != gen.FINISH_REASON_UNSPECIFIED:
            self.record.finish_reason = finish_reason_name(chunk.finish_reason)
        if chunk.HasField("usage"):
            self.record.prompt_tokens = chunk.usage.prompt_tokens
            self.record.replica = chunk.timing.replica
            self.record.decode_s = chunk.timing.decode_ms / 1e3

    def answered(self, response: gen.GenerateResponse) -> None:
        self.record.replica = response.timing.replica
        self.record.decode_s = response.timing.decode_ms / 1e3
        self.record.finish_reason = finish_reason_name(response.finish_reason)
        self.record.prompt_tokens = response.usage.prompt_tokens
        self.record.completion_tokens = response.usage.completion_tokens

    def tokens_used(self) -> int:
        """Tokens to charge: the replica's counts (its usage carries the prompt's); a request cut
        off before that is charged the estimate, one that produced nothing costs none."""
        r = self.record
        if r.prompt_tokens:
            return r.prompt_tokens + r.completion_tokens
        return self.prompt_estimate + r.completion_tokens if r.completion_tokens else 0


def route_key(
    request: gen.GenerateRequest, metadata: grpc.aio.Metadata | None, *, label: str, tenant: str
) -> RouteKey:
    """The request as routing policies see it: the one place they are read from the wire."""
    session = next((v for k, v in metadata or () if k == SESSION_HEADER), "")
    session = session if isinstance(session, str) else ""  # a binary (-bin) value is no key
    if (bad := session_violation(session)) is not None:
        raise invalid_fields("invalid request", [bad])
    messages = ((m.role, m.content) for m in request.messages)
    return RouteKey(
        model=request.model,
        label=label,
        tenant=tenant,
        session=session,
        # a token_ids prompt is keyed by its ids
        prefix=""
        if request.token_ids
        else prompt_prefix(
            instructions=request.instructions, messages=messages, prompt=request.prompt
        ),
        token_ids=tuple(request.token_ids[:MAX_PREFIX_TOKENS]),
    )


def check_request(request: gen.GenerateRequest, tenant: Tenant) -> None:
    """What the router itself checks: a model named and bounded, a request id fit for logs,
    a priority within the tenant's ceiling (the replica checks the rest)."""
    bad = identity_violations(request.model, request.request_id)
    if not request.model:
        bad.append(FieldViolation("model", "must name a model (ListModels shows them)"))
    if request.priority > tenant.max_priority:
        why = (
            f"{request.priority} is above tenant {tenant.name!r}'s ceiling of {tenant.max_priority}"
        )
        bad.append(FieldViolation("priority", why))
    if bad:
        raise invalid_fields("invalid request", bad)


def _end_span(span: trace.Span, record: RequestRecord) -> None:
    span.set_attribute("meshllm.request_id", record.request_id)
    span.set_attribute("meshllm.completion_tokens", record.completion_tokens)
    span.set_attributes(
        usage_attributes(record.finish_reason, record.prompt_tokens, record.completion_tokens)
    )
    end_with_error(span, record.code)


@contextlib.asynccontextmanager
async def routed(
    name: str,
    request: gen.GenerateRequest,
    call: Call,
    *,
    metrics: RouterMetrics,
    admission: Admission,
    served: Callable[[str], ServedModel | None],
    label: Callable[[str], str],
) -> AsyncIterator[RoutedRequest]:
    """Track ``request`` (span, metrics, access log) and hold its tenant's quota while the block
    runs; settle with the tokens it used, however it ends."""
    model = label(request.model)
    span = tracer.start_span(
        name,
        context=extract(call.metadata),
        kind=SpanKind.SERVER,
        attributes={
            "meshllm.model": model,
            "meshllm.tenant": call.tenant.name,
            **rpc_attributes(name.rpartition("/")[2]),
            **generation_attributes(request),
            "gen_ai.request.model": model,  # the bounded label, not what the caller sent
        },
    )
    with metrics.track(model, on_end=functools.partial(_end_span, span)) as record:
        record.tenant = call.tenant.name
        check_request(request, call.tenant)  # before the id is logged or the model echoed
        request.request_id = request.request_id or uuid.uuid4().hex
        record.request_id = request.request_id
        route = route_key(request, call.metadata, label=model, tenant=call.tenant.name)
        routed = RoutedRequest(request, record, span, prompt_estimate(request), route)
        held = None
        if not call.tenant.limits.unlimited:  # no registry scan for an unmetered tenant
            tokens = routed.prompt_estimate + budget(request, served(request.model))
            held = await admission.reserve(call.tenant, tokens, span)
        try:
            await call.send_headers(held.remaining.headers() if held is not None else ())
            yield routed
        finally:
            if held is not None:
                await admission.settle(held, routed.tokens_used())
