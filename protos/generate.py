"""Regenerate the committed Python code from the .proto files, or check that it is current.

python protos/generate.py          # write protos/src/meshllm/api/v1/*_pb2*.py(i)
python protos/generate.py --check  # exit 1 and list the stale files
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "src"
PROTOS = sorted((ROOT / "meshllm" / "api" / "v1").glob("*.proto"))


def generate(out: Path) -> None:
    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(ROOT)) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def stale_files() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = sorted(Path(tmp).rglob("*_pb2*"))
        committed = sorted(OUT.rglob("*_pb2*"))
        names = {p.relative_to(tmp) for p in fresh} | {p.relative_to(OUT) for p in committed}
        return [
            str(name)
            for name in sorted(names)
            if not (Path(tmp) / name).exists()
            or not (OUT / name).exists()
            or not filecmp.cmp(Path(tmp) / name, OUT / name, shallow=False)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    if parser.parse_args().check:
        stale = stale_files()
        if stale:
            print("stale generated code (run: python protos/generate.py):", *stale, sep="\n  ")
            sys.exit(1)
        print("generated code is current")
        return
    generate(OUT)


if __name__ == "__main__":
    main()
