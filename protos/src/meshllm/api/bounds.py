"""Bounds on what a caller sends that servers echo, log or label: checked the same way by the
router (before anything is logged or counted) and by the replica.

``request_id`` appears in every access line and span, so it is restricted to characters that
cannot break a log line (no space, newline, quote or backslash); ``model`` is bounded in length.
``shown`` is how an error message quotes a caller's string: truncated, so a reply never grows
with the input (a long echo would overflow gRPC's metadata limit and turn into another error).
"""

from __future__ import annotations

import re

from meshllm.api.errors import FieldViolation

MAX_MODEL_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
MAX_SHOWN_CHARS = 64
"""Characters of a caller's string an error message quotes."""
MAX_MESSAGE_CHARS = 1024
"""Longest status message a server sends (a last guard; messages are built short)."""
UNKNOWN_MODEL_LABEL = "(unknown)"
"""The ``model`` label value of requests for a model the server does not know: one series for
all of them, however many names callers invent."""

# Visible ASCII (0x21-0x7e) without the quotes and the backslash.
_REQUEST_ID = re.compile(r"[\x21\x23-\x26\x28-\x5b\x5d-\x7e]+")
REQUEST_ID_RULE = (
    f"1 to {MAX_REQUEST_ID_CHARS} visible ASCII characters, no space, quote or backslash"
)


def shown(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` quoted for an error message, cut to ``limit`` characters (saying how long it
    was), with control characters escaped."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters."""
    return message if len(message) <= limit else message[: limit - 3] + "..."


def identity_violations(model: str, request_id: str) -> list[FieldViolation]:
    """What is wrong with a request's ``model`` and ``request_id`` (empty id: the server makes
    one). An empty model is the caller's service's to report, with its own hint."""
    bad: list[FieldViolation] = []
    if len(model) > MAX_MODEL_CHARS:
        bad.append(
            FieldViolation("model", f"is {len(model)} characters; at most {MAX_MODEL_CHARS}")
        )
    if request_id and (
        len(request_id) > MAX_REQUEST_ID_CHARS or not _REQUEST_ID.fullmatch(request_id)
    ):
        bad.append(FieldViolation("request_id", f"must be {REQUEST_ID_RULE}"))
    return bad
