"""A tiny random Llama in the Hugging Face layout (FP16 safetensors), built offline.

ExLlamaV3 loads an unquantized Hugging Face folder directly, so this is what the GPU tests and
the benchmark run the ``exllamav3`` engine on: ``config.json`` (``LlamaForCausalLM``),
``model.safetensors`` with the standard tensor names, and the byte-level tokenizer files.
Every size is a multiple of 128 (ExLlamaV3's kernels want that) and the head size is 128. The
byte vocabulary (261 tokens) is padded with reserved special tokens to 384.

The weights are seeded random numbers, written byte for byte the same every time. As in the
CTranslate2 demo model, the text is meaningless but steered towards letters and spaces, and
away from every special token (end-of-sequence included, so a reply runs to ``max_tokens``):
channel 0 of the residual stream holds a constant (the embeddings set it, no layer writes to
it), and the output head reads it as a per-token bias.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshllm.replica.models.byte_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    SPECIALS,
    reserved_token,
    special_token_id,
    vocabulary,
    write_tokenizer_files,
)
from meshllm.replica.models.tiny import (
    build_once,
    default_cache_dir,
    llama_decoder_spec,
    readable_bias,
    save_ct2_model,
)

_BUILD_VERSION = 1  # bump when the recipe's output changes so cached folders are rebuilt
WEIGHTS_FILE = "model.safetensors"
_BIAS_CHANNEL = 4.0  # the constant in residual channel 0
_SPECIAL_BIAS = -30.0


@dataclass(frozen=True, kw_only=True)
class TinyLlamaRecipe:
    """Shape of a generated Llama; the defaults make a 2-layer, 1.4 M-parameter model."""

    name: str = "tiny-llama"
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    vocab_size: int = 384
    """At least the byte tokenizer's 261 tokens; the rest are reserved special tokens."""
    context_length: int = 2048
    rope_theta: float = 10000.0
    seed: int = 1234

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def cache_key(self) -> str:
        return (
            f"{self.name}-v{_BUILD_VERSION}-h{self.hidden_size}-i{self.intermediate_size}"
            f"-l{self.num_layers}-a{self.num_heads}-kv{self.num_kv_heads}-v{self.vocab_size}"
            f"-c{self.context_length}-s{self.seed}"
        )


TINY_LLAMA = TinyLlamaRecipe()
# For benchmarks on a GPU: 4 layers, head size 128, grouped-query attention, 13 M parameters.
BENCH_LLAMA = TinyLlamaRecipe(
    name="bench-llama",
    hidden_size=512,
    intermediate_size=1536,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
)


def ensure_tiny_llama(recipe: TinyLlamaRecipe = TINY_LLAMA, cache_dir: Path | None = None) -> Path:
    """Return the folder of ``recipe``, building it once (cached like the demo model)."""
    root = cache_dir or default_cache_dir()
    return build_once(root / recipe.cache_key, WEIGHTS_FILE, lambda f: write_tiny_llama(recipe, f))


def ensure_ct2_twin(
    recipe: TinyLlamaRecipe = TINY_LLAMA,
    quantization: str = "float32",
    cache_dir: Path | None = None,
) -> Path:
    """Return the CTranslate2 twin of ``recipe`` (same weights), building it once."""
    root = cache_dir or default_cache_dir()
    target = root / f"{recipe.cache_key}-ct2-{quantization}"
    return build_once(target, "model.bin", lambda f: write_ct2_twin(recipe, f, quantization))


def write_tiny_llama(recipe: TinyLlamaRecipe, folder: Path) -> None:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files into ``folder``."""
    from safetensors.numpy import save_file

    if recipe.vocab_size < len(vocabulary()):
        raise ValueError(f"vocab_size {recipe.vocab_size} < {len(vocabulary())} byte-level tokens")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config(recipe), indent=2) + "\n")
    save_file(llama_weights(recipe), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    write_tokenizer_files(
        folder, recipe.context_length, reserved=recipe.vocab_size - len(vocabulary())
    )


def llama_config(recipe: TinyLlamaRecipe) -> dict[str, object]:
    """``config.json`` as Hugging Face writes it for ``LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size,
        "num_hidden_layers": recipe.num_layers,
        "num_attention_heads": recipe.num_heads,
        "num_key_value_heads": recipe.num_kv_heads,
        "head_dim": recipe.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": recipe.rope_theta,
        "max_position_embeddings": recipe.context_length,
        "vocab_size": recipe.vocab_size,
        "bos_token_id": special_token_id(BOS_TOKEN),
        "eos_token_id": special_token_id(EOS_TOKEN),
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float16",
    }


def llama_weights(recipe: TinyLlamaRecipe) -> dict[str, np.ndarray]:
    """Every tensor of the model by its Hugging Face name, FP16, from ``recipe.seed``."""
    rng = np.random.default_rng(recipe.seed)
    h, inter, v = recipe.hidden_size, recipe.intermediate_size, recipe.vocab_size
    q_rows, kv_rows = recipe.num_heads * recipe.head_dim, recipe.num_kv_heads * recipe.head_dim

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(np.sqrt(cols))

    def writes_no_channel_0(m: np.ndarray) -> np.ndarray:
        m[0, :] = 0.0  # output row 0 feeds residual channel 0: keep the constant there
        return m

    embed = rng.standard_normal((v, h), dtype=np.float32)
    embed[:, 0] = _BIAS_CHANNEL
    tensors = {"model.embed_tokens.weight": embed}
    for i in range(recipe.num_layers):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.input_layernorm.weight": np.ones(h, dtype=np.float32),
            f"{p}.self_attn.q_proj.weight": mat(q_rows, h),
            f"{p}.self_attn.k_proj.weight": mat(kv_rows, h),
            f"{p}.self_attn.v_proj.weight": mat(kv_rows, h),
            f"{p}.self_attn.o_proj.weight": writes_no_channel_0(mat(h, q_rows)),
            f"{p}.post_attention_layernorm.weight": np.ones(h, dtype=np.float32),
            f"{p}.mlp.gate_proj.weight": mat(inter, h),
            f"{p}.mlp.up_proj.weight": mat(inter, h),
            f"{p}.mlp.down_proj.weight": writes_no_channel_0(mat(h, inter)),
        }
    head = mat(v, h) * np.float32(1.5)
    head[:, 0] = token_bias(v) / _BIAS_CHANNEL
    tensors["model.norm.weight"] = np.ones(h, dtype=np.float32)
    tensors["lm_head.weight"] = head
    return {name: t.astype(np.float16) for name, t in tensors.items()}


def token_bias(vocab_size: int) -> np.ndarray:
    """Letters and spaces up, special tokens (reserved ones too) far down."""
    bias = np.full(vocab_size, _SPECIAL_BIAS, dtype=np.float32)
    bytes_bias = readable_bias(len(vocabulary()))
    bias[: len(bytes_bias)] = bytes_bias
    bias[: len(SPECIALS)] = _SPECIAL_BIAS
    return bias


def write_ct2_twin(recipe: TinyLlamaRecipe, folder: Path, quantization: str = "float32") -> None:
    """The same Llama as a CTranslate2 model, so both engines can run the very same weights
    (a like-for-like engine benchmark, and an independent implementation to check against)."""
    w = {name: t.astype(np.float32) for name, t in llama_weights(recipe).items()}
    spec = llama_decoder_spec(
        recipe.num_layers,
        recipe.num_heads,
        recipe.num_kv_heads,
        rope_theta=recipe.rope_theta,
        head_dim=recipe.head_dim,
    )
    dec = spec.decoder
    dec.scale_embeddings = False
    dec.embeddings.weight = w["model.embed_tokens.weight"]
    dec.layer_norm.gamma = w["model.norm.weight"]
    dec.projection.weight = w["lm_head.weight"]
    for i, layer in enumerate(dec.layer):
        p = f"model.layers.{i}"
        attn, ffn = layer.self_attention, layer.ffn
        attn.layer_norm.gamma = w[f"{p}.input_layernorm.weight"]
        attn.linear[0].weight = np.concatenate(
            [w[f"{p}.self_attn.{x}_proj.weight"] for x in ("q", "k", "v")]
        )
        attn.linear[1].weight = w[f"{p}.self_attn.o_proj.weight"]
        ffn.layer_norm.gamma = w[f"{p}.post_attention_layernorm.weight"]
        ffn.linear_0.weight = w[f"{p}.mlp.gate_proj.weight"]
        ffn.linear_0_noact.weight = w[f"{p}.mlp.up_proj.weight"]
        ffn.linear_1.weight = w[f"{p}.mlp.down_proj.weight"]
    reserved = recipe.vocab_size - len(vocabulary())
    tokens = [*vocabulary(), *(reserved_token(i) for i in range(reserved))]
    save_ct2_model(
        spec,
        folder,
        tokens=tokens,
        quantization=quantization,
        context_length=recipe.context_length,
        reserved=reserved,
    )
