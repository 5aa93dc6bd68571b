"""Deterministic tiny Llama-style CTranslate2 models, built offline in well under a second.

The weights are random (seeded), so the text is meaningless, but every layer above the engine
(tokenization, batching, streaming, cancellation, routing) runs for real. The vocabulary is
byte-level: 256 byte tokens plus a few specials, so any UTF-8 text round-trips and the model can
emit byte sequences that split multi-byte characters, which is what the detokenizer must handle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.replica.models.byte_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    UNK_TOKEN,
    byte_token_id,
    special_token_id,
    vocabulary,
    write_tokenizer_files,
)
from meshllm.replica.settings import cache_dir

_BUILD_VERSION = 3  # bump when the recipe changes so cached folders are rebuilt


@dataclass(frozen=True, kw_only=True)
class TinyModelRecipe:
    """Shape and numeric format of a generated model."""

    name: str
    """Used in the cache folder name and as the default model id."""
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    quantization: str
    """CTranslate2 weight format: float32 for exactness tests, int8 for speed."""
    context_length: int = 2048
    seed: int = 1234

    @property
    def cache_key(self) -> str:
        return (
            f"{self.name}-v{_BUILD_VERSION}-d{self.d_model}-l{self.num_layers}-h{self.num_heads}"
            f"-kv{self.num_kv_heads}-f{self.ffn_dim}-{self.quantization}-s{self.seed}"
        )


DEMO = TinyModelRecipe(
    name="demo",
    d_model=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    ffn_dim=192,
    quantization="float32",
)
BENCH = TinyModelRecipe(
    name="bench",
    d_model=256,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    ffn_dim=768,
    quantization="int8",
)
RECIPES = {r.name: r for r in (DEMO, BENCH)}


def default_cache_dir() -> Path:
    return cache_dir() / "models"


def ensure_model(recipe: TinyModelRecipe, cache_dir: Path | None = None) -> Path:
    """Return the folder of ``recipe``, building it once; concurrent callers are safe."""
    root = cache_dir or default_cache_dir()
    return build_once(root / recipe.cache_key, "model.bin", lambda f: write_model(recipe, f))


def build_once(target: Path, marker: str, write: Callable[[Path], None]) -> Path:
    """Return ``target``, first writing it with ``write`` unless ``target/marker`` exists.

    The folder is written under a temporary name and renamed, so readers never see a
    half-written one and concurrent builders (test workers, replica processes) are safe.
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        try:
            os.rename(staging, target)  # atomic: readers never see a half-written folder
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_model(recipe: TinyModelRecipe, folder: Path) -> None:
    """Write a CTranslate2 model plus ``tokenizer.json`` and ``tokenizer_config.json``."""
    tokens = vocabulary()
    spec = llama_decoder_spec(recipe.num_layers, recipe.num_heads, recipe.num_kv_heads)
    _fill_weights(spec.decoder, recipe, len(tokens))
    save_ct2_model(
        spec,
        folder,
        tokens=tokens,
        quantization=recipe.quantization,
        context_length=recipe.context_length,
    )


def llama_decoder_spec(
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    *,
    rope_theta: float = 10000.0,
    head_dim: int | None = None,
    rotary_dim: int = 0,
) -> Any:
    """An empty CTranslate2 Llama-style decoder (pre-norm RMSNorm, SwiGLU, rotary embeddings,
    grouped-query attention) for the caller to fill with weights."""
    from ctranslate2.specs import common_spec, transformer_spec

    return transformer_spec.TransformerDecoderModelSpec.from_config(
        num_layers,
        num_heads,
        activation=common_spec.Activation.SWISH,
        pre_norm=True,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=rotary_dim,  # 0: the whole head
        rotary_interleave=False,
        rotary_base=rope_theta,
        num_heads_kv=num_kv_heads,
        head_dim=head_dim,
    )


def save_ct2_model(
    spec: Any,
    folder: Path,
    *,
    tokens: list[str],
    quantization: str,
    context_length: int,
    reserved: int = 0,
) -> None:
    """Finish a filled decoder spec with the byte vocabulary (plus ``reserved`` special tokens
    at its end) and write it, quantized, with its tokenizer files."""
    spec.register_vocabulary(tokens)
    spec.config.bos_token = BOS_TOKEN
    spec.config.eos_token = EOS_TOKEN
    spec.config.unk_token = UNK_TOKEN
    spec.config.layer_norm_epsilon = 1e-5
    spec.validate()
    spec.optimize(quantization=quantization)
    folder.mkdir(parents=True, exist_ok=True)
    spec.save(str(folder))
    write_tokenizer_files(folder, context_length, reserved=reserved)


def _fill_weights(dec: Any, recipe: TinyModelRecipe, vocab_size: int) -> None:
    rng = np.random.default_rng(recipe.seed)
    d, ffn = recipe.d_model, recipe.ffn_dim
    head_dim = d // recipe.num_heads
    qkv_rows = (recipe.num_heads + 2 * recipe.num_kv_heads) * head_dim

    def mat(rows: int, cols: int) -> np.ndarray:
        scale = np.float32(1.0 / np.sqrt(cols))
        return rng.standard_normal((rows, cols), dtype=np.float32) * scale

    ones = np.ones(d, dtype=np.float32)
    dec.scale_embeddings = False
    dec.embeddings.weight = rng.standard_normal((vocab_size, d)).astype(np.float32)
    dec.layer_norm.gamma = ones
    dec.projection.weight = mat(vocab_size, d) * 1.5
    dec.projection.bias = readable_bias(vocab_size)
    for layer in dec.layer:
        layer.self_attention.layer_norm.gamma = ones
        layer.self_attention.linear[0].weight = mat(qkv_rows, d)
        layer.self_attention.linear[1].weight = mat(d, d)
        layer.ffn.layer_norm.gamma = ones
        layer.ffn.linear_0.weight = mat(ffn, d)
        layer.ffn.linear_0_noact.weight = mat(ffn, d)
        layer.ffn.linear_1.weight = mat(d, ffn)


def readable_bias(vocab_size: int) -> np.ndarray:
    """Favour lowercase letters and spaces so demo output looks like words, keep EOS rare."""
    bias = np.full(vocab_size, -3.0, dtype=np.float32)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        bias[byte_token_id(ord(ch))] = 3.0
    bias[byte_token_id(ord(" "))] = 4.0
    for ch in "éü":  # a few two-byte characters keep the UTF-8 reassembly honest
        for b in ch.encode():
            bias[byte_token_id(b)] = 1.5
    bias[special_token_id(EOS_TOKEN)] = -1.0
    bias[special_token_id(BOS_TOKEN)] = -30.0
    return bias
