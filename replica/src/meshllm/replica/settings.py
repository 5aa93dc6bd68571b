"""Environment variables, read in one place (prefix ``MESHLLM_``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where generated models and other build products are cached."""
    env = os.environ.get("MESHLLM_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "meshllm"


def cuda_visible_devices() -> str | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it (None: unset, every device visible)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")
