"""meshllm errors -> OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` with
the HTTP status each gRPC status stands for, and the headers clients act on.

A caller's mistake is always 4xx (OpenAI clients retry 5xx many times); 429 carries
``Retry-After`` in whole seconds (at most 60) and ``retry-after-ms``, plus ``x-ratelimit-*`` where
the limit is known; 503 carries ``Retry-After`` when the mesh knows when to try again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from meshllm.api.errors import MeshError
from meshllm.router.quota.limits import (
    REQUESTS_PER_MINUTE,
    TOKENS_PER_MINUTE,
    TenantLimits,
)

MAX_RETRY_AFTER_S = 60
_CODES = grpc.StatusCode
# gRPC status -> (HTTP status, OpenAI error type)
STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    _CODES.INVALID_ARGUMENT: (400, "invalid_request_error"),
    _CODES.UNAUTHENTICATED: (401, "invalid_request_error"),
    _CODES.PERMISSION_DENIED: (403, "permission_error"),
    _CODES.NOT_FOUND: (404, "invalid_request_error"),
    _CODES.ABORTED: (409, "conflict_error"),
    _CODES.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    _CODES.CANCELLED: (499, "cancelled"),
    _CODES.INTERNAL: (500, "server_error"),
    _CODES.FAILED_PRECONDITION: (503, "service_unavailable"),  # known model, not loaded yet
    _CODES.UNAVAILABLE: (503, "service_unavailable"),
    _CODES.DEADLINE_EXCEEDED: (504, "timeout"),
}
_CODE_NAMES = {
    _CODES.UNAUTHENTICATED: "invalid_api_key",
    _CODES.NOT_FOUND: "model_not_found",
    _CODES.RESOURCE_EXHAUSTED: "rate_limit_exceeded",
}
_CONTEXT_WORDS = ("exceeds the context", "the model's context is")


@dataclass(frozen=True)
class HttpError:
    """One error reply: status, body and headers."""

    status: int
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def http_error(error: MeshError, limits: TenantLimits | None = None) -> HttpError:
    """The reply for ``error``; ``limits`` (the caller's) fills the ``x-ratelimit-limit-*``
    headers of a 429."""
    status, kind = STATUS.get(error.code, (500, "server_error"))
    param = error.field_violations[0].field if error.field_violations else None
    if error.code == _CODES.NOT_FOUND:
        param = "model"
    code = _CODE_NAMES.get(error.code) or (error.reason.lower() or None)
    message = error.message
    if any(w in v.description for v in error.field_violations for w in _CONTEXT_WORDS):
        # the words clients look for to shorten the prompt rather than retry
        message = f"This request exceeds the model's maximum context length: {message}"
        code = "context_length_exceeded"
    headers: dict[str, str] = {}
    if error.retry_after is not None and status in (429, 503):
        headers.update(retry_after(error.retry_after))
    if status == 429:
        headers.update(exhausted_headers(error, limits))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return HttpError(status, error_body(message, kind, param, code), headers)


def retry_after(seconds: float) -> dict[str, str]:
    """``Retry-After`` as whole seconds from 1 to 60 (what OpenAI clients parse and honour),
    and the exact wait in ``retry-after-ms`` (which the OpenAI SDK reads first)."""
    whole = min(max(math.ceil(seconds), 1), MAX_RETRY_AFTER_S)
    exact = min(max(seconds, 0.001), MAX_RETRY_AFTER_S)
    return {"Retry-After": str(whole), "retry-after-ms": str(math.ceil(exact * 1000))}


def exhausted_headers(error: MeshError, limits: TenantLimits | None) -> dict[str, str]:
    """``x-ratelimit-*`` for the per-minute limits the request ran into: nothing left, full
    again after the wait the quota named. Limits not hit get no header rather than a guess."""
    hit = set(error.metadata.get("limits", "").split(","))
    wait = f"{max(error.retry_after or 0.0, 0.001):.3f}"
    out: dict[str, str] = {}
    for limit, unit in ((REQUESTS_PER_MINUTE, "requests"), (TOKENS_PER_MINUTE, "tokens")):
        if limit not in hit:
            continue
        cap = getattr(limits, limit, None) if limits is not None else None
        if cap is not None:
            out[f"x-ratelimit-limit-{unit}"] = str(cap)
        out[f"x-ratelimit-remaining-{unit}"] = "0"
        out[f"x-ratelimit-reset-{unit}"] = wait
    return out


def quota_headers(headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The quota left after an admission (the gRPC initial metadata), as HTTP headers; a reset
    of 0 (the bucket is full) is left out: clients read 0 as "wait until now"."""
    return {k: v for k, v in headers if not (k.startswith("x-ratelimit-reset") and float(v) <= 0)}
