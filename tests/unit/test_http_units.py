"""The HTTP front's pure parts: OpenAI bodies -> GenerateRequest, replies, and errors -> HTTP."""

from __future__ import annotations

from typing import Any

import pytest

from meshllm.api.errors import (
    FieldViolation,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.router.config import RouterConfig
from meshllm.router.http import requests
from meshllm.router.http.errors import http_error, quota_headers, retry_after
from meshllm.router.http.replies import Reply
from meshllm.router.quota.limits import TenantLimits

CHAT = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> requests.Parsed:
    return requests.chat({"model": "m", "messages": CHAT, **fields}, None)


def refused(body: Any, parse: Any = requests.chat) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as e:
        parse(body, None)
    return e.value


def test_chat_fields_map_to_the_generate_request() -> None:
    parsed = requests.chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": "ok", "name": "bot"},
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 3,
            "stop": "\n",
            "seed": 2**63,
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
            "logprobs": False,
            "frequency_penalty": 0,
            "presence_penalty": 0.0,
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "user": "someone",
        },
        "req-1",
    )
    r = parsed.request
    assert [(m.role, m.content) for m in r.messages] == [
        ("system", "rules"),
        ("user", "ab"),
        ("assistant", "ok"),
    ]
    assert (r.max_tokens, r.temperature, r.top_k, list(r.stop), r.seed) == (
        7,
        0.0,
        3,
        ["\n"],
        2**63,
    )
    assert r.top_p == pytest.approx(0.5) and r.request_id == "req-1"
    assert parsed.stream and parsed.include_usage
    assert not chat().stream and not chat().request.HasField("max_tokens")  # the model's default


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frequency_penalty": 0.1}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"made_up": 1}, "made_up"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"seed": -1}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            "messages[0].tool_calls",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_unsupported_or_bad_chat_fields_are_refused_by_name(
    fields: dict[str, Any], param: str
) -> None:
    error = refused({"model": "m", "messages": CHAT, **fields})
    assert [v.field for v in error.field_violations] == [param]
    assert param in error.message


def test_completion_prompts() -> None:
    assert requests.completion({"model": "m", "prompt": "x"}, None).request.prompt == "x"
    assert requests.completion({"model": "m", "prompt": ["x"]}, None).request.prompt == "x"
    tokens = requests.completion({"model": "m", "prompt": [1, 2, 3]}, None).request
    assert list(tokens.token_ids) == [1, 2, 3] and not tokens.prompt
    for bad in (["a", "b"], [], "", [[1], [2]], [-1], None, {"text": "x"}):
        error = refused({"model": "m", "prompt": bad}, requests.completion)
        assert [v.field for v in error.field_violations] == ["prompt"], bad
    for field, value in (("echo", True), ("best_of", 2), ("suffix", "end"), ("messages", CHAT)):
        error = refused({"model": "m", "prompt": "x", field: value}, requests.completion)
        assert [v.field for v in error.field_violations] == [field]
    assert [v.field for v in refused([1, 2]).field_violations] == ["body"]


def test_request_id_header() -> None:
    assert requests.request_id(None) is None
    assert requests.request_id("job-1:item.2_x") == "job-1:item.2_x"
    for bad in ("", "a b", "x" * 129, "a\nb"):
        with pytest.raises(InvalidArgument):
            requests.request_id(bad)


def chunk(text: str, reason: int = 0, **fields: Any) -> gen.GenerateChunk:
    return gen.GenerateChunk(text=text, finish_reason=reason, **fields)  # type: ignore[arg-type]


def test_stream_chunks_and_the_usage_chunk() -> None:
    reply = Reply(chat=True, id="r", model="m", created=5)
    first = reply.chunk(chunk(""), first=True, include_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["usage"] is None and first["object"] == "chat.completion.chunk"
    last = reply.chunk(chunk("end", gen.FINISH_REASON_LENGTH), first=False, include_usage=False)
    assert last["choices"][0] == {
        "index": 0,
        "delta": {"content": "end"},
        "finish_reason": "length",
        "logprobs": None,
    }
    assert "usage" not in last  # not asked for: no null usage either
    usage = reply.usage_chunk(gen.Usage(prompt_tokens=3, completion_tokens=4))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7
    text = Reply(chat=False, id="r", model="m", created=5)
    assert text.chunk(chunk("a"), first=True, include_usage=False)["choices"][0]["text"] == "a"


def test_a_reply_that_did_not_finish_is_an_error_not_a_success() -> None:
    reply = Reply(chat=True, id="r", model="m", created=5)
    for reason in (gen.FINISH_REASON_CANCELLED, gen.FINISH_REASON_ERROR):
        with pytest.raises(MeshError):
            reply.whole(gen.GenerateResponse(text="partial", finish_reason=reason))
        with pytest.raises(MeshError):
            reply.chunk(chunk("", reason), first=False, include_usage=False)
    whole = reply.whole(gen.GenerateResponse(text="", finish_reason=gen.FINISH_REASON_STOP))
    assert whole["choices"][0]["message"]["content"] == "" and whole["usage"]["total_tokens"] == 0


def test_errors_have_openai_shape_and_status() -> None:
    bad = http_error(InvalidArgument("x", field_violations=[FieldViolation("top_p", "too big")]))
    assert bad.status == 400 and bad.body["error"]["param"] == "top_p"
    assert set(bad.body["error"]) == {"message", "type", "param", "code"}
    missing = http_error(NotFound("model 'x' is not served"))
    assert (missing.status, missing.body["error"]["code"]) == (404, "model_not_found")
    assert http_error(PermissionDenied("no")).status == 403
    down = http_error(Unavailable("none", reason="NO_HEALTHY_REPLICA", retry_after=2.5))
    assert down.status == 503 and down.headers["Retry-After"] == "3"
    assert down.body["error"]["code"] == "no_healthy_replica"
    too_long = http_error(
        InvalidArgument(
            "prompt: too long",
            field_violations=[
                FieldViolation("prompt", "prompt is 9 tokens; the model's context is 8")
            ],
        )
    )
    assert too_long.status == 400 and "maximum context length" in too_long.body["error"]["message"]


def test_quota_refusal_headers() -> None:
    error = ResourceExhausted(
        "over quota",
        reason="QUOTA_EXCEEDED",
        retry_after=0.25,
        metadata={"tenant": "t", "limits": "requests_per_minute"},
    )
    reply = http_error(error, TenantLimits(requests_per_minute=10, tokens_per_minute=500))
    assert reply.status == 429
    assert reply.headers == {
        "Retry-After": "1",
        "retry-after-ms": "250",
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "0.250",
    }
    assert retry_after(3600)["Retry-After"] == "60"  # clients wait at most a minute
    headers = (("x-ratelimit-remaining-tokens", "5"), ("x-ratelimit-reset-tokens", "0.000"))
    assert quota_headers(headers) == {"x-ratelimit-remaining-tokens": "5"}


def test_http_settings_by_flat_name_and_their_checks() -> None:
    config = RouterConfig.from_flat({"auth": "none", "http_port": 8080, "http_timeout_s": 5.0})
    assert (config.http.port, config.http.timeout_s) == (8080, 5.0)
    assert RouterConfig(auth="none").http.port is None  # off unless asked for
    with pytest.raises(InvalidArgument) as e:
        RouterConfig.from_flat({"auth": "none", "http_port": 70000, "http_timeout_s": 0}).validate()
    assert {v.field for v in e.value.field_violations} == {"http_port", "http_timeout_s"}
