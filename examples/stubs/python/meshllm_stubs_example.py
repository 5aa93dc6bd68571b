"""Calling meshllm from its generated gRPC stubs with plain grpcio (sync), no meshllm client library.

docs/stubs.md shows the regions between ``[START name]`` and ``[END name]``; tests check that the
doc's copies equal them, run this code against a scripted server (grpcio-testing,
tests/unit/test_stubs_grpc_testing.py) and against a real router (tests/integration/test_stubs.py).
"""

from __future__ import annotations

# [START imports]
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from meshllm.api.v1 import generation_pb2 as pb
from meshllm.api.v1 import generation_pb2_grpc as pb_grpc

# [END imports]


# [START connect]
def connect(target: str) -> tuple[grpc.Channel, pb_grpc.GenerationStub]:
    """One channel carries any number of concurrent calls: make it once and reuse it."""
    channel = grpc.insecure_channel(target)  # TLS: grpc.secure_channel(target, credentials)
    return channel, pb_grpc.GenerationStub(channel)


def auth(api_key: str) -> tuple[tuple[str, str]]:
    """The router reads the API key from the ``authorization`` metadata, as ``Bearer <key>``."""
    return (("authorization", f"Bearer {api_key}"),)


# [END connect]


# [START errors]
@dataclass(frozen=True)
class Failure:
    """A failed call: its status and the google.rpc details the server attached."""

    code: grpc.StatusCode
    message: str
    reason: str = ""  # ErrorInfo.reason, e.g. QUOTA_EXCEEDED, STREAM_INTERRUPTED
    error_metadata: dict[str, str] = field(default_factory=dict)  # ErrorInfo.metadata
    retry_after_s: float | None = None  # RetryInfo.retry_delay: wait this long, then retry
    field_violations: tuple[tuple[str, str], ...] = ()  # BadRequest: (field, description)
    quota_violations: tuple[tuple[str, str], ...] = ()  # QuotaFailure: (subject, description)


class CallFailed(Exception):
    """A call that failed. ``partial_text`` is what a stream sent before it broke: never a reply."""

    def __init__(self, failure: Failure, partial_text: str = "") -> None:
        super().__init__(f"{failure.code.name}: {failure.message}")
        self.failure = failure
        self.partial_text = partial_text


def decode_failure(error: grpc.RpcError) -> Failure:
    """Decode ``grpc-status-details-bin`` (a google.rpc.Status) into its detail messages."""
    status = rpc_status.from_call(error)  # None when the server attached no details
    found: dict[str, Any] = {}
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.update(reason=info.reason, error_metadata=dict(info.metadata))
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found["retry_after_s"] = retry.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found["field_violations"] = tuple(
                (v.field, v.description) for v in bad.field_violations
            )
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            found["quota_violations"] = tuple((v.subject, v.description) for v in quota.violations)
    return Failure(code=error.code(), message=error.details() or "", **found)


# [END errors]


# [START stream]
@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str  # FINISH_REASON_STOP (end of sequence, a stop string) or _LENGTH
    completion_tokens: int
    rate_limits: dict[str, str]  # x-ratelimit-* from the initial metadata (router with quotas)


def rate_limits(metadata: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    return {k: v for k, v in metadata or () if k.startswith("x-ratelimit-") and isinstance(v, str)}


def stream(
    stub: pb_grpc.GenerationStub,
    request: pb.GenerateRequest,
    *,
    api_key: str,
    timeout_s: float,
    on_text: Callable[[str], object],
) -> Reply:
    """Stream a reply, handing each chunk's text to ``on_text``; ``timeout_s`` is the deadline."""
    call = stub.GenerateStream(request, metadata=auth(api_key), timeout=timeout_s)
    parts: list[str] = []
    last: pb.GenerateChunk | None = None
    try:
        limits = rate_limits(call.initial_metadata())
        for chunk in call:
            parts.append(chunk.text)
            on_text(chunk.text)
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                last = chunk  # only the last chunk has finish_reason, usage and timing
    except grpc.RpcError as e:  # e.g. UNAVAILABLE STREAM_INTERRUPTED after some chunks
        raise CallFailed(decode_failure(e), "".join(parts)) from None
    return finished(parts, last, limits)


def finished(parts: list[str], last: pb.GenerateChunk | None, limits: dict[str, str]) -> Reply:
    """A whole reply, or CallFailed when the stream ended without its last chunk."""
    if last is None:
        incomplete = Failure(grpc.StatusCode.DATA_LOSS, "the stream ended without a last chunk")
        raise CallFailed(incomplete, "".join(parts))
    reason = pb.FinishReason.Name(last.finish_reason)
    return Reply("".join(parts), reason, last.usage.completion_tokens, limits)


# [END stream]


# [START cancel]
def first_chunks(
    stub: pb_grpc.GenerationStub,
    request: pb.GenerateRequest,
    *,
    api_key: str,
    timeout_s: float,
    chunks: int,
) -> str:
    """Stream only the first ``chunks`` chunks, then cancel: the replica stops generating and
    the router charges the tenant only the tokens made so far."""
    call = stub.GenerateStream(request, metadata=auth(api_key), timeout=timeout_s)
    parts: list[str] = []
    try:
        for chunk in call:
            parts.append(chunk.text)
            if len(parts) == chunks:
                break
    except grpc.RpcError as e:
        raise CallFailed(decode_failure(e), "".join(parts)) from None
    finally:
        call.cancel()  # nothing happens if the call has already ended
    return "".join(parts)


# [END cancel]


# [START retry]
RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


def generate(
    stub: pb_grpc.GenerationStub,
    request: pb.GenerateRequest,
    *,
    api_key: str,
    timeout_s: float,
    attempts: int = 4,
    sleep: Callable[[float], object] = time.sleep,
) -> Reply:
    """One whole reply; a refusal that carries RetryInfo (quota, a full queue, no replica ready)
    is retried after the delay the server names. A request the server will never take
    (INVALID_ARGUMENT, NOT_FOUND, ...) fails at once. ``timeout_s`` covers every attempt."""
    deadline = time.monotonic() + timeout_s
    attempt = 1
    while True:
        try:
            remaining = max(deadline - time.monotonic(), 0.0)
            response, call = stub.Generate.with_call(
                request, metadata=auth(api_key), timeout=remaining
            )
            reason = pb.FinishReason.Name(response.finish_reason)
            limits = rate_limits(call.initial_metadata())
            return Reply(response.text, reason, response.usage.completion_tokens, limits)
        except grpc.RpcError as e:
            failure = decode_failure(e)
        wait = failure.retry_after_s
        if failure.code not in RETRYABLE or wait is None or attempt == attempts:
            raise CallFailed(failure)
        # a little jitter, so that clients refused together do not all come back together
        wait *= random.uniform(1.0, 1.2)
        if time.monotonic() + wait > deadline:
            raise CallFailed(failure)
        sleep(wait)
        attempt += 1


# [END retry]
