"""Forwarding one request: pick a replica, relay the reply, retry elsewhere before the first token.

The router is a proxy, so requests and chunks stay protobuf messages here (converting them to
domain objects and back would only cost time); the routing decisions themselves work on the
plain dataclasses of ``registry`` and ``balancer``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from meshllm.api.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    MeshError,
    NotFound,
    Unavailable,
    from_rpc_error,
    invalid_argument,
)
from meshllm.api.tracing import child_of, end_with_error, ending, extract, inject, tracer
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router.admission import Admission, Headers
from meshllm.router.balancer import Policy
from meshllm.router.config import RouterConfig
from meshllm.router.convert import REPLICA_DEFAULT_MAX_TOKENS
from meshllm.router.metrics import RouterMetrics
from meshllm.router.placement import plan
from meshllm.router.pool import ReplicaLink, ReplicaPool
from meshllm.router.registry import Registry, Replica, ReplicaState, ServedModel
from meshllm.router.tenants import Tenant
from meshllm.server.metrics import RequestRecord

log = logging.getLogger(__name__)

Metadata = grpc.aio.Metadata
TimeRemaining = Callable[[], float | None]


@dataclass(frozen=True)
class Call:
    """What the service layer knows of one incoming call."""

    tenant: Tenant
    time_remaining: TimeRemaining
    metadata: Metadata | None
    send_headers: Callable[[Headers], Awaitable[None]]
    """Sends the initial metadata (quota left) before the first reply message."""


# Failures that say "this replica cannot take it now": another replica may. A caller's mistake
# (INVALID_ARGUMENT), its deadline or its cancellation would fail the same way everywhere.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
})  # fmt: skip


def _end_span(span: trace.Span, record: RequestRecord) -> None:
    """End the request's span with the status its metrics recorded."""
    span.set_attribute("meshllm.request_id", record.request_id)
    span.set_attribute("meshllm.completion_tokens", record.completion_tokens)
    end_with_error(span, record.code)


class Forwarder:
    def __init__(self, config: RouterConfig, registry: Registry, pool: ReplicaPool, *,
                 policy: Policy, metrics: RouterMetrics, admission: Admission) -> None:  # fmt: skip
        self._config, self._registry, self._pool, self._policy = config, registry, pool, policy
        self._metrics, self._admission = metrics, admission
        self._catalog = frozenset(m.id for m in config.models)

    # -- picking -----------------------------------------------------------------------------

    def pick(self, model: str, tried: Sequence[Replica]) -> ReplicaLink:
        """The replica for the next attempt, or the error that explains why there is none."""
        while True:
            candidates = self._registry.candidates(model, exclude=tried)
            if not candidates:
                raise self._no_replica(model, tried)
            replica = self._policy.pick(candidates)
            link = self._pool.link(replica)
            if link is not None:
                return link
            tried = [*tried, replica]  # removed between listing and picking

    def _no_replica(self, model: str, tried: Sequence[Replica]) -> MeshError:
        retry = self._config.retry_after_s
        if tried:
            return Unavailable(
                f"no replica could take the request for {model!r}: {len(tried)} tried "
                f"({', '.join(r.name for r in tried)})", reason="NO_HEALTHY_REPLICA",
                retry_after=retry, metadata={"model": model},
            )  # fmt: skip
        held = plan.hosting(self._registry.replicas.values(), model)
        states = {ReplicaState.LOADING if r.claim else r.state for r in held}
        if ReplicaState.LOADING in states:
            return Unavailable(f"model {model!r} is still loading", reason="MODEL_LOADING",
                               retry_after=retry, metadata={"model": model})  # fmt: skip
        if not states and model in self._catalog:
            return FailedPrecondition(
                f"model {model!r} is in the catalog but loaded on no replica; an admin can load "
                f"it (meshllm admin load {model})", reason="MODEL_NOT_LOADED", metadata={"model": model},
            )  # fmt: skip
        ready = self._registry.ready_models()
        if not states and (ready or self._catalog) and not self._registry.knows(model):
            available = sorted({*ready, *self._catalog})
            return NotFound(f"unknown model {model!r}; available: {', '.join(available)}")
        return Unavailable(f"no healthy replica serves {model!r} now", reason="NO_HEALTHY_REPLICA",
                           retry_after=retry, metadata={"model": model})  # fmt: skip

    @contextlib.contextmanager
    def _attempt(self, parent: trace.Span, link: ReplicaLink) -> Iterator[trace.Span]:
        """A span per replica tried; the replica's own spans nest under it."""
        span = tracer.start_span("meshllm.router/forward", context=child_of(parent), kind=SpanKind.CLIENT,
                                 attributes={"meshllm.replica": link.replica.name, "net.peer.name": link.replica.address})  # fmt: skip
        with ending(span):
            yield span

    def budget(self, request: gen.GenerateRequest, served: ServedModel | None) -> int:
        """Tokens the request may generate: its max_tokens, else the default of the model
        ``served`` (as a replica reported it)."""
        if request.HasField("max_tokens"):
            return request.max_tokens
        return served.default_max_tokens if served is not None else REPLICA_DEFAULT_MAX_TOKENS

    def _served(self, model: str) -> ServedModel | None:
        """The model as some replica serving it now reports it (admission's budget, before a
        replica is picked)."""
        for replica in self._registry.ready_models().get(model, ()):
            if replica.served is not None:
                return replica.served
        return None

    # -- forwarding --------------------------------------------------------------------------

    def prepare(self, request: gen.GenerateRequest) -> None:
        if not request.model:
            raise invalid_argument("model", "must name a model (ListModels shows them)")
        if not request.request_id:
            request.request_id = uuid.uuid4().hex

    def _timeout(self, remaining: float | None) -> float | None:
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("deadline exceeded before a replica could take the request")
        return remaining

    def _next(self, model: str, tried: list[Replica], last: MeshError | None) -> ReplicaLink:
        if len(tried) >= self._config.max_attempts and last is not None:
            raise last
        try:
            link = self.pick(model, tried)
        except Unavailable:
            if last is not None:  # what the last replica said explains more than "none left"
                raise last from None
            raise
        tried.append(link.replica)
        return link

    def _failed(
        self, error: grpc.aio.AioRpcError, link: ReplicaLink, streamed: int | None
    ) -> MeshError:
        """The error to give the client, or to keep as the reason when a retry also fails.

        ``streamed`` is None until the first chunk went out; after it, only the client's own
        deadline or cancellation keeps its status: anything else is UNAVAILABLE, never a reply
        that looks complete.
        """
        replica, code, mesh = link.replica, error.code(), from_rpc_error(error)
        # A replica's own UNAVAILABLE (loading, draining) carries a reason; a bare one is the
        # transport: connection refused or reset, the process gone.
        transport_failure = code == grpc.StatusCode.UNAVAILABLE and not mesh.reason
        if transport_failure:
            replica.eject(f"{code.name}: {error.details()}")
            log.warning("replica %s unreachable (%s); ejected until it reports again",
                        replica.name, error.details())  # fmt: skip
        if streamed is not None and code not in (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
        ):
            return Unavailable(
                f"replica {replica.name} failed after streaming {streamed} tokens "
                f"({code.name}: {error.details()}); the reply is incomplete",
                reason="STREAM_INTERRUPTED", metadata={"replica": replica.name, "tokens_streamed": str(streamed)},
            )  # fmt: skip
        if transport_failure:
            mesh = Unavailable(f"replica {replica.name}: {code.name}: {error.details()}",
                               reason="REPLICA_FAILED", retry_after=self._config.retry_after_s,
                               metadata={"replica": replica.name})  # fmt: skip
        return mesh

    def _retryable(self, error: grpc.aio.AioRpcError, model: str, tried: Sequence[Replica]) -> bool:
        if error.code() not in RETRYABLE:
            return False
        self._metrics.retries.labels(model, error.code().name).inc()
        log.info("attempt %d on %s failed before the first token (%s); trying another replica",
                 len(tried), tried[-1].name, error.code().name)  # fmt: skip
        return True

    @contextlib.contextmanager
    def _tracked(
        self, name: str, request: gen.GenerateRequest, call: Call
    ) -> Iterator[tuple[RequestRecord, trace.Span]]:
        """One request's server span and metrics record, ended together with one status."""
        span = tracer.start_span(name, context=extract(call.metadata), kind=SpanKind.SERVER,
                                 attributes={"meshllm.model": request.model, "meshllm.tenant": call.tenant.name})  # fmt: skip
        with self._metrics.track(
            request.model, on_end=functools.partial(_end_span, span)
        ) as record:
            record.tenant = call.tenant.name
            self.prepare(request)
            record.request_id = request.request_id
            yield record, span

    async def stream(
        self, request: gen.GenerateRequest, call: Call
    ) -> AsyncGenerator[gen.GenerateChunk]:
        """Relay the reply of one replica; before its first chunk, failures move to another."""
        with self._tracked("meshllm.router/GenerateStream", request, call) as (record, span):
            async with self._admitted(request, call, record, span), \
                    contextlib.aclosing(self._stream(request, call.time_remaining, span)) as chunks:  # fmt: skip
                async for chunk in chunks:
                    record.tokens(len(chunk.token_ids))
                    if chunk.HasField("usage"):
                        record.prompt_tokens = chunk.usage.prompt_tokens
                        record.replica = chunk.timing.replica
                    yield chunk

    async def generate(self, request: gen.GenerateRequest, call: Call) -> gen.GenerateResponse:
        """One whole reply; the client has seen nothing until it ends, so any replica failure
        that another replica might not share is retried (bounded by max_attempts)."""
        with self._tracked("meshllm.router/Generate", request, call) as (record, span):
            async with self._admitted(request, call, record, span):
                response = await self._generate(request, call.time_remaining, span)
                record.replica = response.timing.replica
                record.prompt_tokens = response.usage.prompt_tokens
                record.completion_tokens = response.usage.completion_tokens
                return response

    @contextlib.asynccontextmanager
    async def _admitted(
        self, request: gen.GenerateRequest, call: Call, record: RequestRecord, span: trace.Span
    ) -> AsyncIterator[None]:
        """Hold the tenant's quota while the request runs; settled from ``record``'s counts."""

        def budget() -> int:  # only asked for a tenant with limits: no registry scan otherwise
            return self.budget(request, self._served(request.model))

        async with self._admission.admitted(call.tenant, request, budget, record, span) as headers:
            await call.send_headers(headers)
            yield

    async def _stream(
        self, request: gen.GenerateRequest, time_remaining: TimeRemaining, parent: trace.Span
    ) -> AsyncGenerator[gen.GenerateChunk]:
        tried, last = list[Replica](), None
        while True:
            link = self._next(request.model, tried, last)
            with self._registry.lease(link.replica, self.budget(request, link.replica.served)) as lease, \
                    self._attempt(parent, link) as span:  # fmt: skip
                call = link.generation.GenerateStream(
                    request, timeout=self._timeout(time_remaining()), metadata=inject(span)
                )
                streamed: int | None = None
                try:
                    async for chunk in call:
                        streamed = (streamed or 0) + len(chunk.token_ids)
                        lease.received(len(chunk.token_ids))
                        yield chunk
                        if chunk.finish_reason != gen.FINISH_REASON_UNSPECIFIED:
                            return
                    raise Unavailable(
                        f"replica {link.replica.name} ended the stream without a final chunk after "
                        f"{streamed or 0} tokens; the reply is incomplete", reason="STREAM_INTERRUPTED",
                    )  # fmt: skip
                except grpc.aio.AioRpcError as e:
                    last = self._failed(e, link, streamed)
                    if streamed is not None or not self._retryable(e, request.model, tried):
                        raise last from None
                finally:
                    call.cancel()

    async def _generate(
        self, request: gen.GenerateRequest, time_remaining: TimeRemaining, parent: trace.Span
    ) -> gen.GenerateResponse:
        tried, last = list[Replica](), None
        while True:
            link = self._next(request.model, tried, last)
            with self._registry.lease(link.replica, self.budget(request, link.replica.served)), \
                    self._attempt(parent, link) as span:  # fmt: skip
                try:
                    response: gen.GenerateResponse = await link.generation.Generate(
                        request, timeout=self._timeout(time_remaining()), metadata=inject(span)
                    )
                    return response
                except grpc.aio.AioRpcError as e:
                    last = self._failed(e, link, None)
                    if not self._retryable(e, request.model, tried):
                        raise last from None
