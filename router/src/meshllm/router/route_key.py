"""What a routing policy may know of a request: its model, its session key and the start of its
prompt. A plain value built once per request (``request.route_key``), so the policies in
``balancer`` and ``affinity`` work without protobuf.

The session key comes from the caller (gRPC metadata ``x-meshllm-session``; on the HTTP front
also the OpenAI body field ``prompt_cache_key``); it is hashed, never logged or used as a
label. The prompt is kept only as far as any policy may look at it: the router does not
tokenize, so a text prompt is characters and a ``token_ids`` prompt is ids.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from meshllm.api.errors import FieldViolation

SESSION_HEADER = "x-meshllm-session"
"""The gRPC metadata key (and HTTP header) of a request's session key."""
MAX_SESSION_CHARS = 256
MAX_PREFIX_CHARS = 8192
"""Most characters of a text prompt any policy may hash (``affinity_prefix_chars`` at most)."""
MAX_PREFIX_TOKENS = 2048
"""Most token ids of a ``token_ids`` prompt any policy may hash."""
# Separators no prompt text is expected to hold, so "ab" + "c" and "a" + "bc" differ.
_PART, _FIELD = "\x1e", "\x1f"


@dataclass(frozen=True, kw_only=True)
class RouteKey:
    """One request as the routing policies see it."""

    model: str
    label: str = ""
    """The request's bounded metrics label for the model (``Picker.label``)."""
    tenant: str = ""
    session: str = ""
    """The caller's session key ("" when it sent none)."""
    prefix: str = ""
    """The start of a text prompt: instructions, then each message's role and content, or the
    prompt; at most ``MAX_PREFIX_CHARS``."""
    token_ids: tuple[int, ...] = ()
    """The start of a ``token_ids`` prompt, at most ``MAX_PREFIX_TOKENS``."""


NO_KEY = RouteKey(model="")
"""For callers that have no request at hand (tests, comparisons): no model, session or prompt."""


def prompt_prefix(
    *, instructions: str = "", messages: Iterable[tuple[str, str]] = (), prompt: str = ""
) -> str:
    """The text a prefix hash reads, cut at ``MAX_PREFIX_CHARS`` (a long conversation is not
    copied whole)."""
    turns = (f"{role[:64]}{_FIELD}{text[:MAX_PREFIX_CHARS]}" for role, text in messages)
    parts, size = list[str](), 0
    for part in itertools.chain((instructions,), turns, (prompt,)):
        if size >= MAX_PREFIX_CHARS:
            break
        parts.append(part[: MAX_PREFIX_CHARS - size] + _PART)
        size += len(parts[-1])
    return "".join(parts)[:MAX_PREFIX_CHARS]


def session_violation(session: str, field: str = SESSION_HEADER) -> FieldViolation | None:
    """What is wrong with a caller's session key (None: nothing)."""
    if len(session) > MAX_SESSION_CHARS:
        return FieldViolation(field, f"is {len(session)} characters; at most {MAX_SESSION_CHARS}")
    return None
