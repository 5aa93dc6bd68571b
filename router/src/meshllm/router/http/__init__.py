"""The OpenAI-compatible HTTP API of the router (docs/http.md): ``front`` serves it on aiohttp,
``requests`` maps request bodies to ``GenerateRequest``, ``replies`` builds the replies and
``errors`` the error replies."""

from meshllm.router.http.front import HttpFront

__all__ = ["HttpFront"]
