"""A byte-level tokenizer in the Hugging Face ``tokenizers`` format, built without any download.

Token strings use GPT-2's byte-to-unicode mapping, the same convention as real byte-level BPE
tokenizers, so the CTranslate2 vocabulary and ``tokenizer.json`` agree token for token.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIALS = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@cache
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's reversible map from each byte to a printable unicode character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: list[str] = []
    extra = 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return tuple(chars)


def vocabulary() -> list[str]:
    """Token strings by id: the specials first, then the 256 bytes in byte order."""
    return [*SPECIALS, *_byte_chars()]


def special_token_id(token: str) -> int:
    return SPECIALS.index(token)


def byte_token_id(byte: int) -> int:
    return len(SPECIALS) + byte


def reserved_token(index: int) -> str:
    return f"<|reserved_{index}|>"


def build_tokenizer(reserved: int = 0) -> Tokenizer:
    """The byte-level tokenizer; ``reserved`` extra special tokens follow the bytes, to pad the
    vocabulary to a size a model architecture wants (e.g. a multiple of 128)."""
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    extra = [reserved_token(i) for i in range(reserved)]
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (*SPECIALS, *extra)]
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, special_token_id(BOS_TOKEN))],
    )
    return tok


def tokenizer_config(context_length: int) -> dict[str, object]:
    """``tokenizer_config.json``: special tokens, context length and the chat template."""
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "add_bos_token": True,
        "model_max_length": context_length,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer_files(folder: Path, context_length: int, reserved: int = 0) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into a model folder."""
    build_tokenizer(reserved).save(str(folder / "tokenizer.json"))
    config = tokenizer_config(context_length)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
