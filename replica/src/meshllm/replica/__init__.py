"""meshllm replica: one model on one device, streaming tokens over gRPC.

Public API: :class:`Replica` (the model host), :class:`ReplicaConfig`, :class:`ModelSpec`,
and :func:`serve` to run the gRPC server.
"""

from meshllm.api.spec import ModelSpec
from meshllm.replica.config import ReplicaConfig
from meshllm.replica.host import Replica
from meshllm.replica.server import serve

__all__ = ["ModelSpec", "Replica", "ReplicaConfig", "serve"]
