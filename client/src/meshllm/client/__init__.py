"""meshllm client: talk to a router or a replica with the same code.

    from meshllm.client import Client
    with Client("localhost:50051") as client:
        print(client.generate("Hello", model="demo", max_tokens=32).text)
        for chunk in client.stream("Hello", model="demo"):
            print(chunk.text, end="", flush=True)

``AsyncClient`` has the same methods as coroutines / async iterators. Over TLS:
``Client(target, tls=ChannelTLS(ca="ca.pem"))`` (``tls=True``: the system's root certificates).
"""

from meshllm.api.errors import (
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
from meshllm.client._async import AsyncClient
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
    "PermissionDenied",
    "ResourceExhausted",
    "StreamChunk",
    "Timing",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
