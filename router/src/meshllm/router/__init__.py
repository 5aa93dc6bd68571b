"""meshllm router: one Generation endpoint in front of many replicas (least-busy routing)."""

from meshllm.router.config import RouterConfig
from meshllm.router.server import RouterServer, serve

__all__ = ["RouterConfig", "RouterServer", "serve"]
