"""A GGUF file's tokenizer, rebuilt as ``tokenizer.json`` + ``tokenizer_config.json``.

GGUF keeps a byte-level BPE tokenizer as metadata: the token strings (already in the GPT-2
byte-to-unicode alphabet), the merges, each token's type and the name of a pre-tokenizer
(``tokenizer.ggml.pre``: which regex splits words before BPE). This module turns that back into
the Hugging Face ``tokenizers`` objects the replica loads, without transformers.

Only BPE (``tokenizer.ggml.model = "gpt2"``) is rebuilt; SentencePiece vocabularies (``llama``)
carry scores instead of merges and are refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors


class TokenizerUnsupported(ValueError):
    """The GGUF tokenizer is of a kind this converter does not rebuild."""


# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Word-splitting regexes by ``tokenizer.ggml.pre``, as llama.cpp's tokenizer names them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(name: str) -> Any:
    byte_level_gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    byte_level_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if name in ("", "default", "gpt2", "gpt-2"):
        return byte_level_gpt2
    if name == "smollm":  # digits one by one, then GPT-2's regex
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level_gpt2]
        )
    splits = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
    if name in splits:
        split = pre_tokenizers.Split(Regex(splits[name]), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, byte_level_only])
    raise TokenizerUnsupported(
        f"GGUF pre-tokenizer {name!r} is not supported "
        "(supported: default/gpt2, smollm, llama-bpe, qwen2)"
    )


@dataclass(frozen=True)
class GGUFTokenizer:
    """The pieces read from GGUF metadata, and the files written from them."""

    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    pre: str
    bos_id: int | None
    eos_ids: tuple[int, ...]
    """The tokenizer's EOS first, then end-of-turn ids (Llama 3's ``<|eot_id|>``)."""
    unk_id: int | None
    add_bos: bool
    chat_template: str

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> GGUFTokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerUnsupported(
                f"GGUF tokenizer model {kind!r} is not supported: only byte-level BPE ('gpt2') is"
            )
        tokens = list(meta["tokenizer.ggml.tokens"])
        n = len(tokens)

        def token_id(key: str) -> int | None:
            value = meta.get(key)
            return int(value) if isinstance(value, int) and 0 <= value < n else None

        eos = token_id("tokenizer.ggml.eos_token_id")
        turn_ends = (
            token_id("tokenizer.ggml.eot_token_id"),
            token_id("tokenizer.ggml.eom_token_id"),
        )
        eos_ids = tuple(dict.fromkeys(i for i in (eos, *turn_ends) if i is not None))
        return cls(
            tokens=tokens,
            merges=list(meta.get("tokenizer.ggml.merges", [])),
            token_types=[int(t) for t in meta.get("tokenizer.ggml.token_type", [1] * n)],
            pre=str(meta.get("tokenizer.ggml.pre", "")),
            bos_id=token_id("tokenizer.ggml.bos_token_id"),
            eos_ids=eos_ids,
            unk_id=token_id("tokenizer.ggml.unknown_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=str(meta.get("tokenizer.chat_template", "")),
        )

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.tokens[i]

    def build(self) -> Tokenizer:
        vocab = {tok: i for i, tok in enumerate(self.tokens)}
        merges = [_merge_pair(m) for m in self.merges]
        tok = Tokenizer(
            models.BPE(
                vocab=vocab, merges=merges, unk_token=self.token(self.unk_id), fuse_unk=False
            )
        )
        tok.pre_tokenizer = _pre_tokenizer(self.pre)
        tok.decoder = decoders.ByteLevel()
        specials = [
            AddedToken(t, special=kind == _CONTROL, normalized=False)
            for t, kind in zip(self.tokens, self.token_types, strict=True)
            if kind in (_CONTROL, _USER_DEFINED)
        ]
        tok.add_tokens(specials)
        bos = self.token(self.bos_id)
        if self.add_bos and bos is not None and self.bos_id is not None:
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
            )
        return tok

    def tokenizer_config(self, context_length: int) -> dict[str, object]:
        config: dict[str, object] = {
            "add_bos_token": self.add_bos,
            "model_max_length": context_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        for key, i in (
            ("bos_token", self.bos_id),
            ("eos_token", self.eos_ids[0] if self.eos_ids else None),
            ("unk_token", self.unk_id),
        ):
            if i is not None:
                config[key] = self.tokens[i]
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return config

    def generation_config(self) -> dict[str, object]:
        config: dict[str, object] = {"eos_token_id": list(self.eos_ids)}
        if self.bos_id is not None:
            config["bos_token_id"] = self.bos_id
        return config


def _merge_pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise TokenizerUnsupported(f"GGUF merge {merge!r} is not two tokens")
    return left, right
