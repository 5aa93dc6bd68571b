"""GGUF → CTranslate2: a Llama-family GGUF file becomes a model folder the replica serves.

No torch, no transformers: the ``gguf`` package reads the file and dequantizes each tensor to
float32 with numpy, the weights fill a CTranslate2 decoder spec, CTranslate2 quantizes and saves
it, and the tokenizer is rebuilt from the GGUF metadata (``gguf_tokenizer``). The folder is
written under a temporary name and renamed, so it is either whole or absent.

llama.cpp stores the Q and K projections of Llama and Mistral with their rows permuted for its
interleaved rotary layout; they are permuted back here and served with CTranslate2's
non-interleaved rotary, as the Hugging Face weights are. Qwen2 is stored unpermuted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshllm.replica.models.gguf_tokenizer import GGUFTokenizer, TokenizerUnsupported


class ConversionError(ValueError):
    """The file cannot be converted; the message says why in one line."""


QUANTIZATIONS = ("int8", "int8_float16", "float16", "float32")
ARCHITECTURES = ("llama", "mistral", "qwen2")
_PERMUTED_QK = ("llama", "mistral")  # llama.cpp permutes these for its rotary layout
TENSOR_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip
"""Tensor types this converter reads: the ones the ``gguf`` package dequantizes and the
tests exercise."""


@dataclass(frozen=True)
class DecoderShape:
    """The architecture numbers of a GGUF decoder, from its ``{arch}.*`` metadata."""

    architecture: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    ffn: int
    norm_eps: float
    rope_theta: float
    context_length: int

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> DecoderShape:
        arch = str(meta.get("general.architecture", ""))
        if arch not in ARCHITECTURES:
            raise ConversionError(
                f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
            )

        def num(key: str, default: float | None = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ConversionError(f"GGUF metadata {arch}.{key} is missing")
            return value

        scaling = meta.get(f"{arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise ConversionError(f"GGUF rope scaling {scaling!r} is not supported")
        hidden, heads = int(num("embedding_length")), int(num("attention.head_count"))
        head_dim = int(num("attention.key_length", hidden // heads))
        return cls(
            architecture=arch,
            num_layers=int(num("block_count")),
            hidden=hidden,
            num_heads=heads,
            num_kv_heads=int(num("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rotary_dim=int(num("rope.dimension_count", head_dim)),
            ffn=int(num("feed_forward_length")),
            norm_eps=float(num("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(num("rope.freq_base", 10000.0)),
            context_length=int(num("context_length", 2048)),
        )


class GGUFFile:
    """An open GGUF file: metadata as Python values, tensors as float32 arrays on demand."""

    def __init__(self, path: Path) -> None:
        try:
            import gguf
        except ImportError as e:  # pragma: no cover - a dependency of meshllm-replica
            raise ConversionError("the 'gguf' package is needed to read GGUF files") from e
        try:
            self._reader = gguf.GGUFReader(str(path))
        except (OSError, ValueError) as e:
            raise ConversionError(f"{path} is not a readable GGUF file: {e}") from e
        self.path = path
        self.meta: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            try:
                self.meta[key] = field.contents()
            except (ValueError, IndexError, UnicodeDecodeError):
                continue  # a malformed field we do not need; those we need are checked on use
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._gguf = gguf

    def check_tensor_types(self) -> None:
        """Refuse the file up front, before any slow work, if a tensor type is unsupported."""
        for t in self._reader.tensors:
            if t.tensor_type.name not in TENSOR_TYPES:
                raise ConversionError(
                    f"GGUF tensor type {t.tensor_type.name} (tensor {t.name}) is not supported "
                    f"(supported: {', '.join(TENSOR_TYPES)})"
                )

    def has(self, name: str) -> bool:
        return name in self._tensors

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32, in row-major (out_features, in_features) order."""
        t = self._tensors.get(name)
        if t is None:
            raise ConversionError(f"GGUF tensor {name} is missing")
        data = self._gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        # a copy: F32 tensors are read-only views of the memory-mapped file, and CTranslate2
        # quantizes in place
        return np.array(data.reshape(shape), dtype=np.float32)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (rotary pairs interleaved → halves)."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def convert(
    source: Path,
    out: Path,
    *,
    quantization: str = "int8",
    context_length: int | None = None,
    sampling: Mapping[str, float] | None = None,
) -> Path:
    """Write the CTranslate2 folder ``out`` from the GGUF file ``source``; returns ``out``.

    ``sampling`` (temperature, top_k, top_p, repetition_penalty) goes into
    ``generation_config.json``: the defaults of requests that leave them unset. ``out`` must
    not exist yet. Raises :class:`ConversionError` with a one-line reason.
    """
    if quantization not in QUANTIZATIONS:
        raise ConversionError(
            f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}"
        )
    if out.exists():
        raise ConversionError(f"{out} already exists: remove it or choose another folder")
    if not source.is_file():
        raise ConversionError(f"{source} is not a file")
    gguf_file = GGUFFile(source)
    shape = DecoderShape.from_metadata(gguf_file.meta)
    try:
        tokenizer = GGUFTokenizer.from_metadata(gguf_file.meta)
        hf_tokenizer = tokenizer.build()
    except TokenizerUnsupported as e:
        raise ConversionError(str(e)) from e
    gguf_file.check_tensor_types()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        spec = _decoder_spec(gguf_file, shape, tokenizer)
        spec.optimize(quantization=quantization)
        spec.save(str(staging))
        hf_tokenizer.save(str(staging / "tokenizer.json"))
        context = context_length or shape.context_length
        _write_json(staging / "tokenizer_config.json", tokenizer.tokenizer_config(context))
        generation = {**tokenizer.generation_config(), **(sampling or {})}
        _write_json(staging / "generation_config.json", generation)
        _write_json(staging / "meshllm_source.json", _provenance(gguf_file, quantization))
        staging.chmod(0o755)  # mkdtemp made it private
        os.rename(staging, out)  # atomic: the folder is whole or absent
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _decoder_spec(f: GGUFFile, shape: DecoderShape, tokenizer: GGUFTokenizer) -> Any:
    from meshllm.replica.models.tiny import llama_decoder_spec

    spec = llama_decoder_spec(
        shape.num_layers,
        shape.num_heads,
        shape.num_kv_heads,
        rope_theta=shape.rope_theta,
        head_dim=shape.head_dim,
        rotary_dim=0 if shape.rotary_dim == shape.head_dim else shape.rotary_dim,
    )
    dec = spec.decoder
    dec.scale_embeddings = False
    embeddings = f.array("token_embd.weight")
    if embeddings.shape[0] != len(tokenizer.tokens):
        raise ConversionError(
            f"token_embd.weight has {embeddings.shape[0]} rows but the tokenizer "
            f"{len(tokenizer.tokens)} tokens"
        )
    dec.embeddings.weight = embeddings
    dec.layer_norm.gamma = f.array("output_norm.weight")
    # tied embeddings: no output.weight, the projection reuses the embedding matrix
    dec.projection.weight = f.array("output.weight") if f.has("output.weight") else embeddings
    permuted = shape.architecture in _PERMUTED_QK
    for i, layer in enumerate(dec.layer):
        p = f"blk.{i}."
        q, k, v = (f.array(p + f"attn_{n}.weight") for n in "qkv")
        if permuted:
            q, k = _unpermute(q, shape.num_heads), _unpermute(k, shape.num_kv_heads)
        attn = layer.self_attention
        attn.layer_norm.gamma = f.array(p + "attn_norm.weight")
        attn.linear[0].weight = np.concatenate([q, k, v])
        if f.has(p + "attn_q.bias"):  # qwen2
            attn.linear[0].bias = np.concatenate([f.array(p + f"attn_{n}.bias") for n in "qkv"])
        attn.linear[1].weight = f.array(p + "attn_output.weight")
        layer.ffn.layer_norm.gamma = f.array(p + "ffn_norm.weight")
        layer.ffn.linear_0.weight = f.array(p + "ffn_gate.weight")
        layer.ffn.linear_0_noact.weight = f.array(p + "ffn_up.weight")
        layer.ffn.linear_1.weight = f.array(p + "ffn_down.weight")
    spec.register_vocabulary(tokenizer.tokens)
    first_eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", first_eos)):
        if token_id is not None:
            setattr(spec.config, key, tokenizer.tokens[token_id])
    spec.config.unk_token = tokenizer.tokens[
        tokenizer.unk_id if tokenizer.unk_id is not None else (first_eos or 0)
    ]
    spec.config.layer_norm_epsilon = shape.norm_eps
    try:
        spec.validate()
    except ValueError as e:
        raise ConversionError(f"the converted weights do not fit the decoder: {e}") from e
    return spec


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _provenance(f: GGUFFile, quantization: str) -> dict[str, object]:
    return {
        "source": f.path.name,
        "source_sha256": sha256_file(f.path),
        "name": f.meta.get("general.name", ""),
        "license": f.meta.get("general.license", ""),
        "architecture": f.meta.get("general.architecture", ""),
        "quantization": quantization,
    }


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
