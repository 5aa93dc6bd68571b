"""The model folder's tokenizer: encoding, chat templates and incremental detokenization."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from meshllm.api.errors import invalid_argument
from meshllm.replica.types import ChatMessage
from meshllm.replica.validation import SamplingDefaults

_DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class TokenizerFiles:
    tokenizer_json: Path
    config: dict[str, Any]


class ModelTokenizer:
    """Wraps ``tokenizer.json`` and ``tokenizer_config.json`` from a model folder."""

    def __init__(self, folder: Path, chat_template: str = "") -> None:
        path = folder / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: a model folder needs tokenizer.json")
        self._tok = Tokenizer.from_file(str(path))
        cfg_path = folder / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._id_to_token = [self._tok.id_to_token(i) or "" for i in range(self.vocab_size)]
        self.max_token_chars = max(1, *(len(t) for t in self._id_to_token))
        """The longest token's string: no token covers more characters of the input, so text
        of ``n`` characters is at least ``n / max_token_chars`` tokens (checked before
        tokenizing, which can take seconds for a long input)."""
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_ids = frozenset(
            i
            for i in (eos_id, *config_eos_ids(folder))
            if i is not None and 0 <= i < self.vocab_size
        )
        """Ids that end a completion: the tokenizer's ``eos_token`` and the generation config's
        ``eos_token_id`` (Llama 3 ends a chat turn with ``<|eot_id|>``, which is not its
        tokenizer's ``eos_token``)."""
        template = chat_template or self.config.get("chat_template") or _DEFAULT_TEMPLATE
        if isinstance(template, list):  # some configs hold named templates
            template = next((t["template"] for t in template if t.get("name") == "default"), "")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(template)

    def encode(self, text: str) -> list[int]:
        """Encode a plain prompt, adding BOS and other specials as the tokenizer's post-processor
        does."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=True).ids
        return ids

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Render the chat template and encode it (the template supplies the special tokens)."""
        try:
            text = self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise invalid_argument("messages", f"chat template rejected the messages: {e}") from e
        ids: list[int] = self._tok.encode(text, add_special_tokens=False).ids
        return ids

    def tokens(self, ids: Sequence[int]) -> list[str]:
        """Token strings for ids, as CTranslate2 expects them."""
        table = self._id_to_token
        return [table[i] for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=True)
        return text


def config_eos_ids(folder: Path) -> tuple[int, ...]:
    """``eos_token_id`` (one id or a list) of ``generation_config.json``, else of a Hugging Face
    ``config.json`` (a CTranslate2 ``config.json`` has none); () where neither says."""
    for name in ("generation_config.json", "config.json"):
        config = _json_config(folder / name)
        value = config.get("eos_token_id")
        if value is None:
            continue
        ids = [value] if isinstance(value, int) else value
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise ValueError(
                f"{folder / name}: eos_token_id must be an id or a list of ids, got {value!r}"
            )
        return tuple(ids)
    return ()


def config_sampling_defaults(folder: Path) -> SamplingDefaults:
    """Sampling defaults from ``generation_config.json`` (``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``); a value out of range is a ValueError naming it."""
    path = folder / "generation_config.json"
    config = _json_config(path)
    found: dict[str, Any] = {}
    for name, ok in _SAMPLING_RANGES.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
            raise ValueError(f"{path}: {name} {value!r} is out of range")
        found[name] = int(value) if name == "top_k" else float(value)
    return SamplingDefaults(**found)


_SAMPLING_RANGES: dict[str, Callable[[float], bool]] = {
    "temperature": lambda v: 0.0 <= v <= 10.0,
    "top_k": lambda v: v >= 0 and v == int(v),
    "top_p": lambda v: 0.0 < v <= 1.0,
    "repetition_penalty": lambda v: 0.0 < v <= 10.0,
}


def _json_config(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} where it does not exist."""
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return config if isinstance(config, dict) else {}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decodes a short window (the previous delta's tokens plus the new ones) and emits only what
    the new tokens add. An incomplete UTF-8 sequence at the end (decoded as U+FFFD) is held back
    until a later token completes it, or until ``flush``; complete text before it goes out now.
    """

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: context so the decoder sees word boundaries
        self._read = 0  # window tokens before this index were fully emitted
        self._partial = 0  # characters emitted from the still-open part of the window

    def add(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        open_end = text.endswith("\ufffd")
        stable = text.rstrip("\ufffd") if open_end else text
        start = len(prefix_text) + self._partial
        out = stable[start:]
        if open_end:
            self._partial += len(out)
        else:
            self._prefix, self._read, self._partial = self._read, len(self._ids), 0
        return out

    def flush(self) -> str:
        """The rest of the text at the end of the stream, incomplete characters included."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        out = text[len(prefix_text) + self._partial :]
        self._prefix = self._read = len(self._ids)
        self._partial = 0
        return out


def _token_text(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value) if value else ""


def _raise_template_error(message: str) -> NoReturn:
    raise TemplateError(message)
