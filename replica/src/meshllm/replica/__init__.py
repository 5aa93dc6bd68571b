"""meshllm replica: one model on one device, streaming tokens over gRPC.

Public API: :class:`Replica` (the model host), :class:`ReplicaConfig`, :class:`ModelSpec`,
and :func:`serve` to run the gRPC server. Imported on first use, so that the engine process
(``meshllm.replica.engines.worker``) starts without the server's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshllm.api.spec import ModelSpec
    from meshllm.replica.config import ReplicaConfig
    from meshllm.replica.host import Replica
    from meshllm.replica.server import serve

__all__ = ["ModelSpec", "Replica", "ReplicaConfig", "serve"]
_WHERE = {
    "ModelSpec": "meshllm.api.spec",
    "ReplicaConfig": "meshllm.replica.config",
    "Replica": "meshllm.replica.host",
    "serve": "meshllm.replica.server",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
