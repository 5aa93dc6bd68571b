"""Forwarding one request: pick a replica, relay its reply, retry elsewhere before the first token.

The router is a proxy, so requests and chunks stay protobuf messages here (converting them to
domain objects and back would only cost time): this module and ``replica_client`` are the
documented pass-through. Both calls run one attempt loop over the replica's GenerateStream; a
unary call is the stream collected, as on the replica. The routing decisions work on the plain
dataclasses of ``registry``, ``balancer`` and ``picking``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Iterator, Sequence

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from meshllm.api import convert
from meshllm.api.errors import DeadlineExceeded, MeshError, Unavailable, from_rpc_error
from meshllm.api.tracing import child_of, ending, inject, rpc_attributes, tracer
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router.admission import Admission
from meshllm.router.ejection import EjectionWatch
from meshllm.router.fairqueue import AdmissionQueue, Ticket
from meshllm.router.metrics import RouterMetrics
from meshllm.router.outliers import Outcome, outcome_of
from meshllm.router.picking import Picker
from meshllm.router.pool import ReplicaLink
from meshllm.router.registry import Lease, Registry, Replica
from meshllm.router.replica_client import transport_failure
from meshllm.router.request import Call, RoutedRequest, TimeRemaining, budget, routed
from meshllm.router.route_key import RouteKey

log = logging.getLogger(__name__)

# Failures that say "this replica cannot take it now": another replica may. A caller's mistake
# (INVALID_ARGUMENT), its deadline or its cancellation would fail the same way everywhere.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
_CALLERS_OWN = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
_STATUS_WAIT_S = 2.0  # a replica's status follows its final chunk within a millisecond


class Forwarder:
    def __init__(
        self,
        registry: Registry,
        picker: Picker,
        *,
        metrics: RouterMetrics,
        admission: Admission,
        queue: AdmissionQueue,
        max_attempts: int,
        retry_after_s: float,
    ) -> None:
        self._registry, self._picker, self._metrics, self._admission = (
            registry,
            picker,
            metrics,
            admission,
        )
        self._queue = queue
        self._max_attempts, self._retry_s = max_attempts, retry_after_s

    def _routed(
        self, name: str, request: gen.GenerateRequest, call: Call
    ) -> contextlib.AbstractAsyncContextManager[RoutedRequest]:
        return routed(
            name,
            request,
            call,
            metrics=self._metrics,
            admission=self._admission,
            served=self._picker.served,
            label=self._picker.label,
        )

    async def stream(
        self, request: gen.GenerateRequest, call: Call
    ) -> AsyncGenerator[gen.GenerateChunk]:
        """Relay the reply of one replica; before its first chunk, failures move to another."""
        async with self._routed("meshllm.router/GenerateStream", request, call) as req:
            chunks = self._admitted(req, call, relay=True)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    req.streamed(chunk)
                    yield chunk

    async def generate(self, request: gen.GenerateRequest, call: Call) -> gen.GenerateResponse:
        """One whole reply; the client has seen nothing until it ends, so any replica failure
        that another replica might not share is retried (bounded by max_attempts)."""
        async with self._routed("meshllm.router/Generate", request, call) as req:
            chunks = self._admitted(req, call, relay=False)
            async with contextlib.aclosing(chunks):
                response = convert.response_from_chunks([chunk async for chunk in chunks])
            req.answered(response)
            return response

    async def _admitted(
        self, req: RoutedRequest, call: Call, *, relay: bool
    ) -> AsyncGenerator[gen.GenerateChunk]:
        """The attempts, once the fair queue gave the request a slot (at once when the model's
        replicas have room)."""
        ticket = await self._queue.admit(
            req.request.model,
            call.tenant,
            priority=req.request.priority,
            estimate=req.prompt_estimate,
            time_remaining=call.time_remaining,
        )
        try:
            if ticket.waited_s:
                req.span.set_attribute("meshllm.queue_wait_s", ticket.waited_s)
            chunks = self._attempts(req, ticket, call.time_remaining, relay=relay)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        finally:
            ticket.close()

    async def _attempts(
        self, req: RoutedRequest, ticket: Ticket, time_remaining: TimeRemaining, *, relay: bool
    ) -> AsyncGenerator[gen.GenerateChunk]:
        """The reply of the first replica that gives one. ``relay``: each chunk as it comes (no
        retry once one went out); else the whole reply at its end (any attempt may fail)."""
        tried, last = list[Replica](), None
        while True:
            link = self._next(req.route, tried, last)
            try:
                attempt = self._attempt(req, ticket, link, time_remaining, relay=relay)
                async with contextlib.aclosing(
                    attempt
                ):  # a client's cancel reaches the replica now
                    async for chunk in attempt:
                        yield chunk
                return
            except Relayed as e:
                raise e.error from None
            except Retry as e:
                last = e.error
                self._count_retry(req.request.model, tried, e.error.code)
            except grpc.aio.AioRpcError as e:
                last = self._failed(e, link.replica, None)
                if not self._retryable(e, req.request.model, tried):
                    raise last from None

    async def _attempt(
        self,
        req: RoutedRequest,
        ticket: Ticket,
        link: ReplicaLink,
        time_remaining: TimeRemaining,
        *,
        relay: bool,
    ) -> AsyncGenerator[gen.GenerateChunk]:
        replica = link.replica
        with (
            self._registry.lease(replica, budget(req.request, replica.served)) as lease,
            self._span(req.span, link) as span,
        ):
            ticket.on_replica()
            call = link.client.generation.GenerateStream(
                req.request, timeout=_timeout(time_remaining()), metadata=inject(span)
            )
            watch = EjectionWatch(replica, call, self._registry.stale_after_s)
            relayed: int | None = None  # tokens the client has seen; None before the first chunk
            held: list[gen.GenerateChunk] = []
            outcome = Outcome.NEUTRAL  # for outlier ejection; a caller's cancel says nothing
            try:
                async for chunk in call:
                    watch.progress()
                    _received(chunk, lease, ticket)
                    final = chunk.finish_reason != gen.FINISH_REASON_UNSPECIFIED
                    if final and chunk.finish_reason == gen.FINISH_REASON_CANCELLED:
                        outcome = Outcome.FAILURE
                        raise self._cut_short(replica, relayed, "it cancelled the reply itself")
                    if relay:
                        relayed = (relayed or 0) + len(chunk.token_ids)
                        yield chunk
                    else:
                        held.append(chunk)
                    if final:
                        outcome = Outcome.SUCCESS
                        for whole in held:
                            yield whole
                        # The tenant's slot is free before the replica's (the lease, which
                        # ends after its status): the fair queue then sees the tenant one
                        # request lighter when the replica's slot frees.
                        ticket.close()
                        await _ended(call)
                        return
                outcome = Outcome.FAILURE
                raise self._cut_short(replica, relayed, "it ended the stream without a final chunk")
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not watch.fired or (task is not None and task.cancelling()):
                    raise
                raise self._cut_short(replica, relayed, f"ejected: {watch.why}") from None
            except grpc.aio.AioRpcError as e:
                if watch.fired:
                    raise self._cut_short(replica, relayed, f"ejected: {watch.why}") from None
                outcome = outcome_of(e.code())
                if relayed is None:
                    raise
                raise Relayed(self._failed(e, replica, relayed)) from None
            finally:
                watch.close()
                call.cancel()
                self._judge(replica, outcome)

    def _judge(self, replica: Replica, outcome: Outcome) -> None:
        """Count the attempt for outlier ejection (``outliers``), which it may trigger."""
        ejection = self._registry.ended(replica, outcome)
        if ejection is not None:
            self._metrics.outlier_ejections.labels(replica.name).inc()
            log.warning(
                "replica %s ejected as an outlier for %g s (ejection %d in a row): %s",
                replica.name,
                ejection.duration_s,
                ejection.count,
                ejection.why,
            )

    def _cut_short(self, replica: Replica, relayed: int | None, why: str) -> Retry | Relayed:
        """The replica ended the reply early: before the client saw any of it, another replica
        may answer; after, the stream ends UNAVAILABLE, never looking complete."""
        if relayed is None:
            return Retry(
                Unavailable(
                    f"replica {replica.name} gave no complete reply ({why})",
                    reason="REPLICA_FAILED",
                    retry_after=self._retry_s,
                    metadata={"replica": replica.name},
                )
            )
        return Relayed(_interrupted(replica, relayed, why))

    @contextlib.contextmanager
    def _span(self, parent: trace.Span, link: ReplicaLink) -> Iterator[trace.Span]:
        """A span per replica tried; the replica's own spans nest under it."""
        attributes = {
            "meshllm.replica": link.replica.name,
            **rpc_attributes("GenerateStream", link.replica.address),
        }
        span = tracer.start_span(
            "meshllm.router/forward",
            context=child_of(parent),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        with ending(span):
            yield span

    def _next(self, route: RouteKey, tried: list[Replica], last: MeshError | None) -> ReplicaLink:
        if len(tried) >= self._max_attempts and last is not None:
            raise last
        try:
            link = self._picker.pick(route, tried)
        except Unavailable:
            if last is not None:  # what the last replica said explains more than "none left"
                raise last from None
            raise
        tried.append(link.replica)
        return link

    def _failed(
        self, error: grpc.aio.AioRpcError, replica: Replica, relayed: int | None
    ) -> MeshError:
        """The error to give the client, or to keep as the reason when a retry also fails.

        ``relayed`` is None until the first chunk went out; after it, only the client's own
        deadline or cancellation keeps its status: anything else is UNAVAILABLE, never a reply
        that looks complete.
        """
        code, mesh = error.code(), from_rpc_error(error)
        down = transport_failure(mesh)  # connection refused or reset, the process gone
        if down:
            self._registry.eject(replica, f"{code.name}: {error.details()}")
            log.warning(
                "replica %s unreachable (%s); ejected until it reports again",
                replica.name,
                error.details(),
            )
        if relayed is not None and code not in _CALLERS_OWN:
            return _interrupted(replica, relayed, f"{code.name}: {error.details()}")
        if down:
            return Unavailable(
                f"replica {replica.name}: {code.name}: {error.details()}",
                reason="REPLICA_FAILED",
                retry_after=self._retry_s,
                metadata={"replica": replica.name},
            )
        return mesh

    def _retryable(self, error: grpc.aio.AioRpcError, model: str, tried: Sequence[Replica]) -> bool:
        if error.code() not in RETRYABLE:
            return False
        self._count_retry(model, tried, error.code())
        return True

    def _count_retry(self, model: str, tried: Sequence[Replica], code: grpc.StatusCode) -> None:
        self._metrics.retries.labels(model, code.name).inc()
        log.info(
            "attempt %d on %s failed before the first token (%s); trying another replica",
            len(tried),
            tried[-1].name,
            code.name,
        )


class Relayed(Exception):
    """An attempt failed after its first chunk went to the client: no retry."""

    def __init__(self, error: MeshError) -> None:
        super().__init__(error.message)
        self.error = error


class Retry(Exception):
    """An attempt ended before the client saw any of it, in a way another replica may not share."""

    def __init__(self, error: MeshError) -> None:
        super().__init__(error.message)
        self.error = error


def _received(chunk: gen.GenerateChunk, lease: Lease, ticket: Ticket) -> None:
    """Count a chunk's tokens: the replica's load left, and the tenant's share served."""
    lease.received(len(chunk.token_ids))
    ticket.served(len(chunk.token_ids))
    if chunk.HasField("usage"):
        ticket.prompt_tokens = chunk.usage.prompt_tokens


def _interrupted(replica: Replica, relayed: int, why: str) -> Unavailable:
    return Unavailable(
        f"replica {replica.name} failed after streaming {relayed} tokens ({why}); "
        "the reply is incomplete",
        reason="STREAM_INTERRUPTED",
        metadata={"replica": replica.name, "tokens_streamed": str(relayed)},
    )


async def _ended(call: grpc.aio.UnaryStreamCall[gen.GenerateRequest, gen.GenerateChunk]) -> None:
    """Wait (briefly) for the replica to end the call after its final chunk: cancelling it
    sooner races the replica's status, and the replica would record a reply the client received
    whole as CANCELLED."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_STATUS_WAIT_S):
            await call.code()


def _timeout(remaining: float | None) -> float | None:
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("deadline exceeded before a replica could take the request")
    return remaining
