"""``meshllm-replica convert`` on GGUF files written here with the ``gguf`` package's own writer.

Each supported tensor type is checked the same way: a tiny random Llama is written with its 2-D
weights in that type, and again in F32 holding exactly the values the type dequantizes to.
Both convert to float32 CTranslate2 folders that must score a token sequence identically, so a
wrong block decoding, shape or row order fails. The row permutation of Q and K (llama.cpp's
rotary layout) is checked on the real model by perplexity (tests/integration/test_real_model.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ctranslate2
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from meshllm.replica.models.byte_tokenizer import EOS_TOKEN, vocabulary
from meshllm.replica.models.gguf_convert import TENSOR_TYPES, ConversionError, convert
from meshllm.replica.tokenizer import ModelTokenizer

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # K-quants need rows of 256 values
QUANTIZABLE = (T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
# K-quant blocks of 256 values: (bytes per block, offsets of the float16 scales in a block)
K_BLOCKS = {
    T.Q2_K: (84, (80, 82)),
    T.Q3_K: (110, (108,)),
    T.Q4_K: (144, (0, 2)),
    T.Q5_K: (176, (0, 2)),
    T.Q6_K: (210, (208,)),
}


def _encoded(x: np.ndarray, kind: T, rng: np.random.Generator) -> np.ndarray:
    """``x`` in ``kind``'s bytes; K-quants (which gguf cannot quantize) get random blocks with
    small scales, whatever values they hold are the reference."""
    if kind in QUANTIZABLE:
        return gguf.quants.quantize(x, kind)
    size, scale_offsets = K_BLOCKS[kind]
    rows, blocks = x.shape[0], x.shape[1] // 256
    raw = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    for offset in scale_offsets:
        raw[:, :, offset : offset + 2] = scale
    return raw.reshape(rows, blocks * size)


def write_gguf(
    path: Path,
    kind: T = T.F32,
    *,
    arch: str = "llama",
    seed: int = 7,
    weights: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """A tiny random Llama-family GGUF with every matrix in ``kind``; returns the float32 values
    each tensor dequantizes to (pass them back as ``weights`` to write the F32 twin)."""
    rng = np.random.default_rng(seed)
    tokens = vocabulary()
    shapes = {"token_embd.weight": (len(tokens), HIDDEN)}
    for i in range(LAYERS):
        head = HIDDEN // HEADS
        shapes |= {
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") and len(t) > 1 else 1 for t in tokens])
    w.add_token_merges([])
    w.add_eos_token_id(tokens.index(EOS_TOKEN))
    values: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if weights is not None:
            values[name] = weights[name]
            w.add_tensor(name, weights[name])
            continue
        x = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        data = x if kind == T.F32 else _encoded(x, kind, rng)
        w.add_tensor(name, data, raw_dtype=None if kind == T.F32 else kind)
        values[name] = gguf.quants.dequantize(data, kind).reshape(shape).astype(np.float32)
    for i in range(LAYERS):
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(HIDDEN, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def _scores(folder: Path, text: str) -> np.ndarray:
    tok = ModelTokenizer(folder)
    generator = ctranslate2.Generator(str(folder), device="cpu", compute_type="float32")
    result = generator.score_batch([tok.tokens(tok.encode(text))])[0]
    return np.array(result.log_probs)


def test_every_tensor_type_is_exercised() -> None:
    tested = {t.name for t in (*QUANTIZABLE, *K_BLOCKS)} | {"F32"}
    assert tested == set(TENSOR_TYPES)


@pytest.mark.parametrize("kind", [*QUANTIZABLE, *K_BLOCKS], ids=lambda k: k.name)
def test_a_tensor_type_converts_to_exactly_its_dequantized_values(kind: T, tmp_path: Path) -> None:
    values = write_gguf(tmp_path / "q.gguf", kind)
    write_gguf(tmp_path / "f32.gguf", weights=values)
    quantized = convert(tmp_path / "q.gguf", tmp_path / "q", quantization="float32")
    reference = convert(tmp_path / "f32.gguf", tmp_path / "f32", quantization="float32")
    text = "Hello, world: the same weights give the same scores."
    got, want = _scores(quantized, text), _scores(reference, text)
    assert got.shape == want.shape and len(got) > 20
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_scores_compared_depend_on_the_weights(tmp_path: Path) -> None:
    """The comparison above can fail: another model's scores differ by far more than it allows."""
    for seed in (7, 8):
        write_gguf(tmp_path / f"{seed}.gguf", T.Q8_0, seed=seed)
        convert(tmp_path / f"{seed}.gguf", tmp_path / str(seed), quantization="float32")
    text = "Hello, world: the same weights give the same scores."
    a, b = _scores(tmp_path / "7", text), _scores(tmp_path / "8", text)
    assert np.abs(a - b).max() > 0.1


def test_the_folder_holds_tokenizer_and_generation_config(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf")
    folder = convert(tmp_path / "m.gguf", tmp_path / "m", quantization="int8")
    names = {p.name for p in folder.iterdir()}
    assert {"model.bin", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"generation_config.json", "meshllm_source.json"} <= names
    tok = ModelTokenizer(folder)
    assert tok.eos_ids == frozenset({vocabulary().index(EOS_TOKEN)})
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_an_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="already exists"):
        convert(tmp_path / "m.gguf", tmp_path / "out")


def _run_convert(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "meshllm-replica"
    return subprocess.run(
        [str(script), "convert", *args], check=False, capture_output=True, text=True, timeout=120
    )


def test_an_unsupported_architecture_fails_convert_in_one_line(tmp_path: Path) -> None:
    write_gguf(tmp_path / "falcon.gguf", arch="falcon")
    done = _run_convert(str(tmp_path / "falcon.gguf"), str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "architecture 'falcon' is not supported" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_an_unsupported_tensor_type_fails_convert_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    values = write_gguf(tmp_path / "base.gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    reader = gguf.GGUFReader(str(tmp_path / "base.gguf"))
    for key, field in reader.fields.items():  # copy the metadata, then one IQ4_NL tensor
        if key.startswith(("llama.", "tokenizer.")):
            value = field.contents()
            w.add_key_value(key, value, field.types[0], sub_type=field.types[-1])
    blocks = values["token_embd.weight"].shape[1] // 32  # IQ4_NL: 32 values in 18 bytes
    rows = values["token_embd.weight"].shape[0]
    iq = np.zeros((rows, blocks * 18), dtype=np.uint8)
    w.add_tensor("token_embd.weight", iq, raw_dtype=T.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    done = _run_convert(str(path), str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensor type IQ4_NL" in lines[0], done.stderr


def test_convert_cli_writes_a_model(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf", T.Q8_0)
    done = _run_convert(str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--quantization", "int8")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.bin").exists()
    bad = _run_convert(str(tmp_path / "m.gguf"), str(tmp_path / "x"), "--quantization", "int3")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
