"""OpenAI request bodies -> ``GenerateRequest``: every field either mapped exactly or refused by
name (a 400 whose ``param`` is the field), never dropped silently.

Pure functions on decoded JSON: no I/O, so the mapping is tested field by field without a server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshllm.api.errors import invalid_argument
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router.route_key import session_violation

MAX_STOP = 16
"""Stop strings one request may give (OpenAI allows 4; the replica takes more)."""
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Accepted and without effect on what is generated (bookkeeping for OpenAI's own service).
# ``prompt_cache_key`` has none either: it is the session key of the affinity policy.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier"})
# Fields whose neutral value is accepted; any other value is refused until it is supported.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v is None or v == 1,
    "best_of": lambda v: v is None or v == 1,
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v is None or v == 0,
    "echo": lambda v: v is None or v is False,
    "suffix": lambda v: v is None or v == "",
    "tools": lambda v: v is None or v == [],
    "functions": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "function_call": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: True,  # says nothing without tools
    "response_format": lambda v: v is None or v == {"type": "text"},
    # No engine applies OpenAI's additive penalties; repetition_penalty is a different formula.
    "frequency_penalty": lambda v: v is None or v == 0,
    "presence_penalty": lambda v: v is None or v == 0,
    "logit_bias": lambda v: v is None or v == {},
    "modalities": lambda v: v is None or v == ["text"],
    "reasoning_effort": lambda v: v is None,
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "web_search_options": lambda v: v is None,
}
_SAMPLING = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "stop",
        "seed",
        "priority",  # vLLM's extension: GenerateRequest.priority (docs/router.md, fair sharing)
        "prompt_cache_key",
    }
)
CHAT_FIELDS = _SAMPLING | _IGNORED | _NEUTRAL.keys() | {"messages"}
COMPLETION_FIELDS = _SAMPLING | _IGNORED | _NEUTRAL.keys() | {"prompt"}
_ROLES = frozenset({"system", "developer", "user", "assistant"})


@dataclass(frozen=True)
class Parsed:
    """A request as the router runs it, and how the client wants the reply."""

    request: gen.GenerateRequest
    stream: bool
    include_usage: bool
    session: str = ""
    """``prompt_cache_key``: the affinity policy's session key."""


def chat(body: object, request_id: str | None) -> Parsed:
    """A ``/v1/chat/completions`` body."""
    fields = _object(body, CHAT_FIELDS)
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_argument("messages", "must be a non-empty array of {role, content}")
    request = _common(fields, request_id)
    for i, message in enumerate(messages):
        role, content = _message(i, message)
        request.messages.add(role=role, content=content)
    return _parsed(fields, request)


def completion(body: object, request_id: str | None) -> Parsed:
    """A ``/v1/completions`` body."""
    fields = _object(body, COMPLETION_FIELDS)
    request = _common(fields, request_id)
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in an array, as some batch clients send it
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        request.token_ids.extend(prompt)
    else:
        raise invalid_argument(
            "prompt",
            "must be one string or one array of token ids (several prompts in one request are "
            "not supported: send one request each)",
        )
    if not request.prompt and not request.token_ids:
        raise invalid_argument("prompt", "must not be empty")
    return _parsed(fields, request)


def request_id(header: str | None) -> str | None:
    """The client's ``X-Request-Id``, if it sent one we can log and echo safely."""
    if header is None:
        return None
    if not _REQUEST_ID.fullmatch(header):
        raise invalid_argument(
            "x-request-id", "must be 1-128 letters, digits, '.', '_', ':' or '-'"
        )
    return header


def _object(body: object, known: frozenset[str] | set[str]) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise invalid_argument("body", "must be a JSON object")
    for name in sorted(body):
        if name not in known:
            raise invalid_argument(name, "is not a field meshllm knows; remove it")
        if (neutral := _NEUTRAL.get(name)) is not None and not neutral(body[name]):
            raise invalid_argument(
                name, f"{json.dumps(body[name])[:60]} is not supported yet: leave the field out"
            )
    return body


def _common(fields: Mapping[str, Any], request_id: str | None) -> gen.GenerateRequest:
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_argument("model", "must name a model (GET /v1/models lists them)")
    request = gen.GenerateRequest(model=model, request_id=request_id or "")
    if (tokens := _max_tokens(fields)) is not None:
        request.max_tokens = tokens
    for name in ("temperature", "top_p", "repetition_penalty"):
        if (value := fields.get(name)) is not None:
            if not _is_number(value):
                raise invalid_argument(name, "must be a number")
            setattr(request, name, float(value))
    if (top_k := fields.get("top_k")) is not None:
        request.top_k = _natural("top_k", top_k)
    if (seed := fields.get("seed")) is not None:
        request.seed = _natural("seed", seed, limit=2**64 - 1)
    request.stop.extend(_stop(fields.get("stop")))
    if (priority := fields.get("priority")) is not None:
        if type(priority) is not int or not -(2**31) <= priority < 2**31:
            raise invalid_argument("priority", "must be an integer (a 32-bit one)")
        request.priority = priority
    return request


def _max_tokens(fields: Mapping[str, Any]) -> int | None:
    """``max_completion_tokens`` is the newer name of ``max_tokens``; both may come, if equal."""
    values = {
        n: _natural(n, fields[n], minimum=1)
        for n in ("max_completion_tokens", "max_tokens")
        if fields.get(n) is not None
    }
    if len(set(values.values())) > 1:
        raise invalid_argument("max_tokens", "differs from max_completion_tokens: send one")
    return next(iter(values.values()), None)


def _stop(stop: object) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(items, list)
        or not all(isinstance(s, str) and s for s in items)
        or len(items) > MAX_STOP
    ):
        raise invalid_argument("stop", f"must be a string or up to {MAX_STOP} non-empty strings")
    return items


def _message(i: int, message: object) -> tuple[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid_argument(where, "must be an object {role, content}")
    role = message.get("role")
    if role not in _ROLES:
        raise invalid_argument(
            f"{where}.role",
            f"must be one of {', '.join(sorted(_ROLES))} (tool messages need tools, which are "
            "not supported yet)",
        )
    if extra := sorted(set(message) - {"role", "content", "name"}):
        raise invalid_argument(f"{where}.{extra[0]}", "is not supported yet")
    content = _content(where, message.get("content"))
    return ("system" if role == "developer" else role), content


def _content(where: str, content: object) -> str:
    """Text content: a string, or an array of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid_argument(
                    f"{where}.content[{j}]", "only text parts are supported (no images or audio)"
                )
            if not isinstance(text := part.get("text"), str):
                raise invalid_argument(f"{where}.content[{j}].text", "must be a string")
            texts.append(text)
        return "".join(texts)
    raise invalid_argument(f"{where}.content", "must be a string or an array of text parts")


def _parsed(fields: Mapping[str, Any], request: gen.GenerateRequest) -> Parsed:
    stream = fields.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_argument("stream", "must be true or false")
    options = fields.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid_argument("stream_options", "is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid_argument("stream_options", "takes only include_usage")
        include_usage = options.get("include_usage") in (True,)
        if options.get("include_usage") not in (None, True, False):
            raise invalid_argument("stream_options.include_usage", "must be true or false")
    return Parsed(request, bool(stream), include_usage, _session(fields.get("prompt_cache_key")))


def _session(key: object) -> str:
    if key is None:
        return ""
    if not isinstance(key, str):
        raise invalid_argument("prompt_cache_key", "must be a string")
    if (bad := session_violation(key, "prompt_cache_key")) is not None:
        raise invalid_argument(bad.field, bad.description)
    return key


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_token(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**32


def _natural(name: str, value: object, *, minimum: int = 0, limit: int = 2**32 - 1) -> int:
    if type(value) is not int or not minimum <= value <= limit:
        raise invalid_argument(name, f"must be an integer from {minimum} to {limit}")
    return value
