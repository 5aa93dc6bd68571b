"""meshllm client: talk to a router or a replica with the same code.

    from meshllm.client import Client
    with Client("localhost:50051") as client:
        print(client.generate("Hello", model="demo", max_tokens=32).text)
        for chunk in client.stream("Hello", model="demo"):
            print(chunk.text, end="", flush=True)

``AsyncClient`` has the same methods as coroutines / async iterators. A batch::

    with Client("localhost:50051") as client:
        options = BatchOptions(concurrency=16, progress=True)
        for item in client.iter_batch(prompts, model="demo", max_tokens=64, options=options):
            print(item.index, item.result.text if item.result else item.error)

keeps input order and a bounded window, retries transient failures (:class:`RetryPolicy`),
paces itself (:class:`Pacing`) and can stop early (:class:`AbortPolicy`), all set in one
:class:`BatchOptions`. Request keywords (``max_tokens``, ``temperature``, ...) are the fields
of :class:`RequestFields`; the ``*_with`` methods take one of those instead. A call's
``timeout`` defaults to ``USE_CLIENT_DEFAULT`` (the client's); None or ``NO_DEADLINE``: none.
:class:`AdminClient` drives the router's Admin service.
Over TLS: ``Client(target, tls=ChannelTLS(ca="ca.pem"))`` (``tls=True``: the system's root
certificates).
"""

from meshllm.api.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from meshllm.api.tls import ChannelTLS
from meshllm.api.types import (
    FinishReason,
    ModelInfo,
    ModelPlacement,
    QuotaUsage,
    ReplicaState,
    ReplicaStatus,
    Timing,
    Usage,
)
from meshllm.client._abort import AbortPolicy
from meshllm.client._admin import AdminClient, AsyncAdminClient, SpecOverrides
from meshllm.client._async import AsyncClient
from meshllm.client._batch import BatchOptions, OnResult
from meshllm.client._cache import ResponseCache
from meshllm.client._options import (
    NO_DEADLINE,
    USE_CLIENT_DEFAULT,
    RequestFields,
    Timeout,
)
from meshllm.client._pacing import Pacing
from meshllm.client._retry import RetryPolicy
from meshllm.client._sync import Client
from meshllm.client._types import BatchItem, Completion, Prompt, StreamChunk

__all__ = [
    "NO_DEADLINE",
    "USE_CLIENT_DEFAULT",
    "AbortPolicy",
    "Aborted",
    "AdminClient",
    "AsyncAdminClient",
    "AsyncClient",
    "BatchItem",
    "BatchOptions",
    "Cancelled",
    "ChannelTLS",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FinishReason",
    "Internal",
    "InvalidArgument",
    "MeshError",
    "ModelInfo",
    "ModelPlacement",
    "NotFound",
    "OnResult",
    "Pacing",
    "PermissionDenied",
    "Prompt",
    "QuotaUsage",
    "ReplicaState",
    "ReplicaStatus",
    "RequestFields",
    "ResourceExhausted",
    "ResponseCache",
    "RetryPolicy",
    "SpecOverrides",
    "StreamChunk",
    "Timeout",
    "Timing",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
