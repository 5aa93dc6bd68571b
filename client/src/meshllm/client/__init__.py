"""meshllm client: talk to a router or a replica with the same code.

    from meshllm.client import Client
    with Client("localhost:50051") as client:
        print(client.generate("Hello", model="demo", max_tokens=32).text)
        for chunk in client.stream("Hello", model="demo"):
            print(chunk.text, end="", flush=True)

``AsyncClient`` has the same methods as coroutines / async iterators. A batch::

    with Client("localhost:50051") as client:
        for item in client.iter_batch(prompts, model="demo", max_tokens=64, progress=True):
            print(item.index, item.result.text if item.result else item.error)

keeps input order and a bounded window, retries transient failures (:class:`RetryPolicy`),
paces itself (:class:`Pacing`) and can stop early (:class:`AbortPolicy`).
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
from meshllm.client._abort import AbortPolicy
from meshllm.client._async import AsyncClient
from meshllm.client._cache import ResponseCache
from meshllm.client._pacing import Pacing
from meshllm.client._retry import RetryPolicy
from meshllm.client._sync import Client
from meshllm.client._types import (
    BatchItem,
    Completion,
    FinishReason,
    ModelInfo,
    StreamChunk,
    Timing,
    Usage,
)

__all__ = [
    "AbortPolicy",
    "Aborted",
    "AsyncClient",
    "BatchItem",
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
    "NotFound",
    "Pacing",
    "PermissionDenied",
    "ResourceExhausted",
    "ResponseCache",
    "RetryPolicy",
    "StreamChunk",
    "Timing",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
