"""The client's typed options: a call's deadline and a request's sampling fields.

``RequestFields`` is the one definition of the fields a request may set; every client method
takes them as explicit keyword arguments of the same names, types and defaults (a test pins
each method's keywords, sync and async, to these fields).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from meshllm.api.spec import DEFAULT_MAX_TOKENS
from meshllm.api.types import prompt_tokens_estimate


@dataclass(frozen=True, slots=True)
class Timeout:
    """How long one call may take: ``Timeout(30.0)``, or ``Timeout(None)`` (``NO_DEADLINE``).

    Wherever a timeout is taken, a number of seconds means ``Timeout(seconds)`` and None means
    no deadline; a call's ``USE_CLIENT_DEFAULT`` (its default) means the client's timeout.
    """

    seconds: float | None
    """Deadline in seconds from the start of the call; None: none."""

    def __post_init__(self) -> None:
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"timeout: must be above 0 seconds (or None), got {self.seconds}")


NO_DEADLINE: Final = Timeout(None)


class UseClientDefault(enum.Enum):
    """The type of ``USE_CLIENT_DEFAULT``."""

    USE_CLIENT_DEFAULT = "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT: Final = UseClientDefault.USE_CLIENT_DEFAULT
"""A call's timeout when it gives none: the ``timeout`` the client was made with."""

TimeoutArg = Timeout | float | None
"""A timeout as given: a ``Timeout``, seconds, or None (no deadline)."""
CallTimeout = Timeout | float | None | UseClientDefault
"""A call's timeout: as ``TimeoutArg``, or ``USE_CLIENT_DEFAULT``."""


def as_timeout(value: TimeoutArg) -> Timeout:
    if isinstance(value, Timeout):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | None):
        raise TypeError(f"timeout: expected seconds, None or a Timeout, not {value!r}")
    return Timeout(None if value is None else float(value))


def resolve_timeout(value: CallTimeout, default: Timeout) -> float | None:
    """The gRPC deadline, in seconds, of a call given ``value``."""
    return (default if value is USE_CLIENT_DEFAULT else as_timeout(value)).seconds


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestFields:
    """What a request sets besides its model and input; None / empty: the server's default."""

    max_tokens: int | None = None
    """Most tokens to generate (the model's default when unset, 256 unless its spec says)."""
    temperature: float | None = None
    """0 is greedy decoding (and cacheable); unset samples at 1."""
    top_k: int | None = None
    """Sample among the k likeliest tokens (1: greedy)."""
    top_p: float | None = None
    """Sample among the likeliest tokens whose probabilities add up to p."""
    repetition_penalty: float | None = None
    seed: int | None = None
    """Sampling seed; requests with a seed are batched only with the same seed."""
    stop: Sequence[str] = ()
    """Generation stops before the first occurrence of any of these strings."""
    instructions: str | None = None
    """System text: a leading system message for a chat, a prefix for a plain prompt."""
    token_ids: Sequence[int] | None = None
    """Pre-tokenized input, used as is (instead of a prompt)."""
    request_id: str | None = None
    """Echoed back and used in logs and traces; the server makes one when unset."""
    priority: int | None = None
    """Higher runs first when work queues up."""

    def given(self) -> dict[str, Any]:
        """The fields set to something other than their default, as plain JSON values."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = value if isinstance(value, str | None | int | float) else list(value)
        return out

    def updated(self, values: Mapping[str, Any]) -> RequestFields:
        """These fields with ``values`` (a batch item's own) replacing some; TypeError names an
        unknown one."""
        if unknown := set(values) - NAMES:
            raise TypeError(f"unknown request fields: {', '.join(sorted(unknown))}")
        return replace(self, **values) if values else self

    def tokens(self, prompt: str | Sequence[Mapping[str, str]] | None) -> int:
        """Tokens the router reserves for the request: its prompt estimate (as the router makes
        it, ``meshllm.api.types.prompt_tokens_estimate``) plus max_tokens."""
        chat = () if prompt is None or isinstance(prompt, str) else prompt
        estimate = prompt_tokens_estimate(
            prompt=prompt if isinstance(prompt, str) else "",
            messages=((str(m.get("role", "")), str(m.get("content", ""))) for m in chat),
            instructions=self.instructions or "",
            token_ids=len(self.token_ids or ()),
        )
        return estimate + (DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens)


NAMES = frozenset(f.name for f in fields(RequestFields))
