"""meshllm's errors: one class per gRPC status code, carrying the ``google.rpc`` details.

Servers raise these and the service layer turns them into a status with details; the client
turns a failed call back into the same class, so both sides speak one vocabulary::

    MeshError
    ├── InvalidArgument      INVALID_ARGUMENT     BadRequest field violations
    ├── NotFound             NOT_FOUND
    ├── FailedPrecondition   FAILED_PRECONDITION  ErrorInfo reason
    ├── ResourceExhausted    RESOURCE_EXHAUSTED   RetryInfo, QuotaFailure
    ├── Unauthenticated      UNAUTHENTICATED
    ├── PermissionDenied     PERMISSION_DENIED
    ├── Unavailable          UNAVAILABLE          RetryInfo, ErrorInfo reason
    ├── DeadlineExceeded     DEADLINE_EXCEEDED
    ├── Cancelled            CANCELLED
    ├── Aborted              ABORTED              ErrorInfo reason (client batches: BATCH_ABORTED)
    └── Internal             INTERNAL             a bug on our side, never a caller's mistake
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "meshllm"
_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted limit (``google.rpc.QuotaFailure.Violation``)."""

    subject: str
    description: str


class MeshError(Exception):
    """Base class: a gRPC status code, a message and optional structured details."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        retry_after: float | None = None,
        field_violations: Sequence[FieldViolation] = (),
        quota_violations: Sequence[QuotaViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        """Machine-readable cause (``google.rpc.ErrorInfo.reason``), e.g. ``MODEL_NOT_LOADED``."""
        self.retry_after = retry_after
        """Seconds after which a retry may succeed (``google.rpc.RetryInfo``)."""
        self.field_violations = tuple(field_violations)
        self.quota_violations = tuple(quota_violations)
        self.metadata = dict(metadata or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"

    def to_status(self) -> grpc.Status:
        """The status with details, for ``context.abort_with_status``."""
        proto = status_pb2.Status(code=_code_number(self.code), message=self.message)
        for detail in self._details():
            proto.details.add().Pack(detail)
        status: grpc.Status = rpc_status.to_status(proto)
        return status

    def _details(self) -> list[Any]:
        details: list[Any] = []
        if self.reason:
            info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
            info.metadata.update(self.metadata)
            details.append(info)
        if self.retry_after is not None:
            details.append(error_details_pb2.RetryInfo(retry_delay=_duration(self.retry_after)))
        if self.field_violations:
            bad = error_details_pb2.BadRequest()
            for v in self.field_violations:
                bad.field_violations.add(field=v.field, description=v.description)
            details.append(bad)
        if self.quota_violations:
            quota = error_details_pb2.QuotaFailure()
            for q in self.quota_violations:
                quota.violations.add(subject=q.subject, description=q.description)
            details.append(quota)
        return details


class InvalidArgument(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(MeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(MeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MeshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(MeshError):
    code = grpc.StatusCode.CANCELLED


class Aborted(MeshError):
    code = grpc.StatusCode.ABORTED


class Internal(MeshError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Aborted,
        Internal,
    )
}


def invalid_argument(field: str, description: str) -> InvalidArgument:
    """Shorthand for the common one-field INVALID_ARGUMENT."""
    return InvalidArgument(
        f"{field}: {description}", field_violations=[FieldViolation(field, description)]
    )


def invalid_fields(what: str, violations: Sequence[FieldViolation]) -> InvalidArgument:
    """INVALID_ARGUMENT naming every bad field: ``what: field problem; field problem``."""
    listed = "; ".join(f"{v.field} {v.description}" for v in violations)
    return InvalidArgument(f"{what}: {listed}", field_violations=violations)


def status_name(error: BaseException | None) -> str:
    """The gRPC status code name a request ends with, given the exception that ended it (None:
    ``OK``). Used wherever a request's outcome is recorded: metrics, logs, spans."""
    if error is None:
        return "OK"
    if isinstance(error, MeshError):
        return error.code.name
    if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        code: grpc.StatusCode = error.code()
        return code.name
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # the caller left or timed out
        return "CANCELLED"
    return "INTERNAL"


def from_rpc_error(error: grpc.RpcError) -> MeshError:
    """Rebuild the typed error (details included) from a failed call."""
    call: Any = error  # grpc.RpcError raised by a call also implements grpc.Call
    code: grpc.StatusCode = call.code()
    message: str = call.details() or code.name
    cls = _BY_CODE.get(code, MeshError)
    kwargs: dict[str, Any] = {}
    for key, value in call.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            kwargs = _parse_details(status_pb2.Status.FromString(value))
    err = cls(message, **kwargs)
    if cls is MeshError:
        err.code = code  # type: ignore[misc]
    return err


def _parse_details(status: status_pb2.Status) -> dict[str, Any]:
    out: dict[str, Any] = {"field_violations": [], "quota_violations": []}
    for any_msg in status.details:
        if any_msg.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_msg.Unpack(info)
            out["reason"], out["metadata"] = info.reason, dict(info.metadata)
        elif any_msg.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            any_msg.Unpack(retry)
            out["retry_after"] = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        elif any_msg.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_msg.Unpack(bad)
            out["field_violations"] = [
                FieldViolation(v.field, v.description) for v in bad.field_violations
            ]
        elif any_msg.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            any_msg.Unpack(quota)
            out["quota_violations"] = [
                QuotaViolation(v.subject, v.description) for v in quota.violations
            ]
    return out


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = math.floor(max(seconds, 0.0))
    return duration_pb2.Duration(seconds=whole, nanos=int((max(seconds, 0.0) - whole) * 1e9))


def _code_number(code: grpc.StatusCode) -> int:
    number: int = getattr(code_pb2, code.name)
    return number
