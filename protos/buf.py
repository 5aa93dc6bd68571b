"""Lint the .proto files with buf, and check that they break nothing of an earlier commit's.

python protos/buf.py lint                    # buf lint with protos/buf.yaml (its exceptions are explained there)
python protos/buf.py breaking                # against the merge-base with main, or HEAD~1 on main itself
python protos/buf.py breaking --against REF  # against any commit

buf comes from npm (protos/package.json, pinned by package-lock.json; `make setup` runs npm ci).
The earlier protos are taken with `git archive`, so this works in any clone with history and in
git worktrees alike; in a clone without the earlier commit it says so and fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
BUF = ROOT / "node_modules" / ".bin" / "buf"
MAIN_REFS = ("main", "origin/main")


def git(*args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def default_base() -> str | None:
    """The commit this one's protos must stay compatible with."""
    head = git("rev-parse", "HEAD")
    for ref in MAIN_REFS:
        base = git("merge-base", "HEAD", ref)
        if base is not None and base != head:
            return base
    return git("rev-parse", "--verify", "--quiet", "HEAD~1")


def extract_protos(ref: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "protos/meshllm"],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise SystemExit(f"buf breaking: no protos in {ref}: {archive.stderr.decode().strip()}")
    tar_path = into / "protos.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    return into / "protos"


def buf(*args: str) -> int:
    if not BUF.exists():
        raise SystemExit(f"{BUF} is missing: run `make setup` (npm ci --prefix protos)")
    return subprocess.run([str(BUF), *args], cwd=ROOT, check=False).returncode


def breaking(against: str | None) -> int:
    ref = against or default_base()
    if ref is None:
        print("buf breaking: no earlier commit to compare with (a root commit or a shallow clone)")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        old = extract_protos(ref, Path(tmp))
        code = buf("breaking", "--against", str(old))
    short = git("rev-parse", "--short", ref) or ref
    print(f"buf breaking: against {short}: {'no breaking change' if code == 0 else 'BREAKING'}")
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("lint", help="buf lint protos/")
    check = commands.add_parser("breaking", help="buf breaking against an earlier commit")
    check.add_argument("--against", metavar="REF", help="a git commit, branch or tag")
    args = parser.parse_args()
    if args.command == "lint":
        code = buf("lint")
        print("buf lint: clean" if code == 0 else "buf lint: findings above")
        sys.exit(code)
    sys.exit(breaking(args.against))


if __name__ == "__main__":
    main()
