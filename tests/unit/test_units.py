"""Fast unit tests of the pure logic: stop strings, detokenizer, queue, validation, streams."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from meshllm.api.errors import InvalidArgument
from meshllm.api.types import FinishReason
from meshllm.replica.engines.queue import BatchQueue
from meshllm.replica.engines.stream import TokenStream
from meshllm.replica.host import ThroughputMeter
from meshllm.replica.stops import StopMatcher
from meshllm.replica.tokenizer import IncrementalDetokenizer, ModelTokenizer
from meshllm.replica.types import ChatMessage, GenerationRequest, SamplingParams
from meshllm.replica.validation import Limits, check_input, resolve_sampling

LIMITS = Limits(
    context_length=100,
    default_max_tokens=16,
    max_tokens_limit=64,
    vocab_size=261,
    max_input_chars=1000,
)


# -- stop strings ---------------------------------------------------------------------------------


def test_stop_split_across_pieces_is_caught_and_never_sent() -> None:
    m = StopMatcher(("STOP",))
    out = [m.feed(p) for p in ("hello S", "T", "OP and more")]
    assert "".join(out) == "hello "
    assert m.matched == "STOP"
    assert m.flush() == ""


def test_stop_prefix_that_does_not_complete_is_released() -> None:
    m = StopMatcher(("STOP",))
    assert m.feed("abc ST") == "abc "
    assert m.feed("x") == "STx"
    assert m.feed("ST") == ""
    assert m.flush() == "ST"
    assert m.matched == ""


def test_earliest_of_several_stops_wins() -> None:
    m = StopMatcher(("world", "lo w"))
    assert m.feed("hello world") == "hel"
    assert m.matched == "lo w"


# -- detokenizer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path) -> ModelTokenizer:
    return ModelTokenizer(demo_dir)


def test_detokenizer_never_splits_multibyte_characters(tokenizer: ModelTokenizer) -> None:
    text = "héllo 日本語 🎉 done"
    ids = tokenizer.encode(text)[1:]  # drop BOS
    assert len(ids) == len(text.encode())  # byte-level: one token per byte
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text
    assert "🎉" in pieces  # the 4-byte emoji came out whole, in one piece


def test_detokenizer_flushes_an_incomplete_tail_at_the_end(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode("ab日")[1:-1]  # 'a', 'b', and 2 of the 3 bytes of 日
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.add(ids) == "ab"
    assert detok.flush() == "\ufffd"


def test_chat_template_renders_roles(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode_chat([ChatMessage("user", "hi")])
    text = tokenizer._tok.decode(ids, skip_special_tokens=False)
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# -- queue ----------------------------------------------------------------------------------------


def test_batch_queue_groups_by_key_in_priority_order() -> None:
    q: BatchQueue[str] = BatchQueue()
    q.put("a", key="greedy")
    q.put("b", key="hot")
    q.put("c", key="greedy")
    q.put("urgent", key="hot", priority=5)
    assert q.take_batch(8) == ["urgent", "b"]
    assert q.take_batch(1) == ["a"]
    assert q.take_batch(8) == ["c"]
    assert q.take_batch(8) == []


def test_sampling_batch_key_ignores_per_item_settings() -> None:
    a = SamplingParams(temperature=0.0, max_tokens=5, stop=("x",))
    b = SamplingParams(temperature=0.0, top_k=40, max_tokens=500)
    c = SamplingParams(temperature=0.7, max_tokens=5)
    assert a.batch_key() == b.batch_key() != c.batch_key()


# -- validation -----------------------------------------------------------------------------------


def _req(**kw: object) -> GenerationRequest:
    fields: dict[str, object] = {"request_id": "r", "model": "m", "prompt": "hi", **kw}
    return GenerationRequest(**fields)  # type: ignore[arg-type]


def test_all_bad_sampling_fields_are_reported_together() -> None:
    with pytest.raises(InvalidArgument) as e:
        resolve_sampling(_req(temperature=-1.0, top_p=0.0, top_k=-2, max_tokens=65), LIMITS, 10)
    assert {v.field for v in e.value.field_violations} == {
        "temperature",
        "top_p",
        "top_k",
        "max_tokens",
    }


def test_nan_temperature_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="temperature"):
        resolve_sampling(_req(temperature=float("nan")), LIMITS, 10)


def test_default_max_tokens_is_clamped_to_the_context_left() -> None:
    assert resolve_sampling(_req(), LIMITS, 95).max_tokens == 5
    with pytest.raises(InvalidArgument, match="exceeds the context"):
        resolve_sampling(_req(max_tokens=10), LIMITS, 95)
    with pytest.raises(InvalidArgument, match="context is 100"):
        resolve_sampling(_req(), LIMITS, 100)


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"token_ids": (1, 2)}, "token_ids"),  # prompt and token_ids both set
        ({"prompt": "", "token_ids": (999,)}, "token_ids[0]"),
        ({"model": ""}, "model"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"prompt": "", "messages": (ChatMessage("", "hi"),)}, "messages[0].role"),
    ],
)
def test_bad_input_names_the_field(fields: dict[str, object], bad_field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        check_input(_req(**fields), LIMITS)
    assert bad_field in {v.field for v in e.value.field_violations}


# -- token stream ---------------------------------------------------------------------------------


async def test_token_stream_coalesces_when_the_reader_is_slow() -> None:
    stream = TokenStream(asyncio.get_running_loop(), max_tokens=100, eos_ids=frozenset({1}))
    first = asyncio.create_task(stream.read())

    def produce() -> None:
        for t in range(10, 60):
            stream.push(t)
        stream.push(1)  # EOS ends the stream

    await asyncio.sleep(0.01)
    worker = threading.Thread(target=produce)
    worker.start()
    got = await first
    await asyncio.to_thread(worker.join)
    rest = await stream.read()
    assert got + rest == list(range(10, 60))
    assert len(got) > 1 or len(rest) > 1  # 50 tokens in at most two reads: they coalesced
    assert await stream.read() == []
    assert stream.finish_reason is FinishReason.STOP


async def test_token_stream_stops_the_engine_at_max_tokens_and_on_cancel() -> None:
    stream = TokenStream(asyncio.get_running_loop(), max_tokens=3, eos_ids=frozenset())
    assert [stream.push(t) for t in (5, 6, 7)] == [False, False, True]
    assert stream.finish_reason is FinishReason.LENGTH
    other = TokenStream(asyncio.get_running_loop(), max_tokens=10, eos_ids=frozenset())
    other.cancel()
    assert other.push(5) is True


async def test_token_stream_waits_for_min_tokens_or_max_wait() -> None:
    stream = TokenStream(asyncio.get_running_loop(), max_tokens=100, eos_ids=frozenset())
    stream.push(1)
    got = await stream.read(min_tokens=5, max_wait_s=0.02)  # only one token comes: max_wait ends it
    assert got == [1]


def test_throughput_meter_uses_a_sliding_window() -> None:
    now = [100.0]
    meter = ThroughputMeter(window_s=5, clock=lambda: now[0])
    meter.add(50)
    now[0] = 102.0
    meter.add(50)
    assert meter.rate() == 20.0
    now[0] = 105.5
    assert meter.rate() == 10.0  # the first bucket left the window
