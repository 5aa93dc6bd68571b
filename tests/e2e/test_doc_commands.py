"""Every command shown in the README and the docs runs, as written, against a live local mesh —
or is listed in doc_commands.toml with the reason it cannot run here.

The commands run in a network namespace of their own (tests/e2e/netns_shell.py), so the ports
the docs show (:50051, :50061, ...) are free whatever else this machine runs. One test per
fenced block, in document order (the README's admin walk-through changes the mesh as it goes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = tomllib.loads((Path(__file__).parent / "doc_commands.toml").read_text())
BIN = Path(sys.prefix) / "bin"
LANGUAGES = ("sh", "console", "bash", "shell")
ERROR_OUTPUT = re.compile(r"^(ERROR:|Failed to dial|meshllm(-router|-replica)?: )")
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Command:
    text: str
    expected: list[str]
    """The output the doc shows under it (console blocks only)."""

    @property
    def expects_error(self) -> bool:
        return bool(self.expected) and ERROR_OUTPUT.match(self.expected[0]) is not None


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    commands: list[Command]

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def doc_files() -> list[Path]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return docs + sorted(p for p in ROOT.glob("*/README.md") if p.parent.name != "node_modules")


def joined(lines: Iterator[str], first: str) -> str:
    """A command with its backslash-continued lines joined."""
    text = first
    while text.endswith("\\"):
        text = text[:-1].rstrip() + " " + next(lines).strip()
    return text


def parse_block(language: str, body: str) -> list[Command]:
    lines = iter(body.splitlines())
    commands: list[Command] = []
    for line in lines:
        if language == "console":
            if line.startswith("$ "):
                commands.append(Command(joined(lines, line[2:].strip()), []))
            elif commands:
                commands[-1].expected.append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            commands.append(Command(joined(lines, line.strip()), []))
    return commands


def blocks() -> list[Block]:
    found = []
    fence = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    for path in doc_files():
        text = path.read_text()
        for match in fence.finditer(text):
            if match.group(1) in LANGUAGES:
                line = text.count("\n", 0, match.start()) + 1
                doc = str(path.relative_to(ROOT))
                found.append(Block(doc, line, parse_block(match.group(1), match.group(2))))
    first = [
        b for b in found if any(re.search(p, c.text) for p in DATA["first"] for c in b.commands)
    ]
    return first + [b for b in found if b not in first]


def not_run_reason(doc: str, command: str) -> str | None:
    for entry in DATA["not_run"]:
        if entry.get("file", doc) == doc and re.search(entry["match"], command):
            return str(entry["reason"])
    return None


BLOCKS = blocks()


class Namespace:
    """The JSON-lines shell of netns_shell.py, inside ``unshare -n``."""

    def __init__(self, cwd: Path) -> None:
        unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
        env |= {"KEY": "mk-doc-commands-test", "ADMIN_KEY": "mk-doc-commands-admin"}
        script = Path(__file__).parent / "netns_shell.py"
        self._process = subprocess.Popen(
            [*unshare, sys.executable, str(script)],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.servers = 0

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline()
        assert answer, "the namespace shell died"
        result: dict[str, Any] = json.loads(answer)
        return result

    def run(self, cmd: str) -> dict[str, Any]:
        return self.ask(op="run", cmd=cmd, timeout=COMMAND_TIMEOUT_S)

    def start(self, cmd: str, port: int) -> str:
        self.servers += 1
        name = f"server-{self.servers}"
        answer = self.ask(op="start", id=name, cmd=cmd, port=port, timeout=COMMAND_TIMEOUT_S)
        assert answer["rc"] == 0, f"{cmd} did not start listening on {port}:\n{answer['output']}"
        return name

    def stop(self, name: str) -> dict[str, Any]:
        return self.ask(op="stop", id=name)

    def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def namespaces_work() -> bool:
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    if shutil.which("unshare") is None:
        return False
    return subprocess.run([*unshare, "true"], capture_output=True, check=False).returncode == 0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Namespace]:
    if not namespaces_work():
        pytest.skip(
            "needs network namespaces (unshare -n) so the docs' ports can be used as written"
        )
    cwd = tmp_path_factory.mktemp("doc-commands")
    for entry in ROOT.iterdir():
        if entry.name not in (".git", "dist"):
            (cwd / entry.name).symlink_to(entry)
    shell = Namespace(cwd)
    try:
        server = shell.start(DATA["mesh"], 50051)
        deadline = time.monotonic() + 120
        while DATA["mesh_ready"] not in (seen := shell.run("meshllm admin models")["output"]):
            assert time.monotonic() < deadline, f"the mesh did not get ready:\n{seen}"
            time.sleep(0.5)
        yield shell
        stopped = shell.stop(server)
        assert "Traceback" not in stopped["output"], stopped["output"]
    finally:
        shell.close()


def check(command: Command, answer: dict[str, Any]) -> None:
    output = answer["output"]
    assert "Traceback (most recent call last)" not in output, output
    if not command.expects_error:
        assert answer["rc"] == 0, f"exit status {answer['rc']}:\n{output}"
        return
    assert answer["rc"] not in (0, None), f"the doc shows an error; it exited {answer['rc']}"
    shown = command.expected[0]
    if shown.startswith("ERROR:"):
        codes = [line.strip() for line in command.expected if line.strip().startswith("Code:")]
        assert all(code in output for code in codes), output
    else:  # "meshllm: FailedPrecondition: ..." or "meshllm-router: invalid router config: ..."
        head = ":".join(shown.split(":")[:2])
        assert head in output, output


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_commands_run(mesh: Namespace, block: Block) -> None:
    skipped = {
        c.text: reason for c in block.commands if (reason := not_run_reason(block.doc, c.text))
    }
    servers = []
    try:
        for command in block.commands:
            if command.text in skipped:
                continue
            if re.search(DATA["server"], command.text) and not command.expects_error:
                port = re.search(r"--port (\d+)", command.text)
                assert port is not None, f"a server command without --port: {command.text}"
                servers.append(mesh.start(command.text, int(port.group(1))))
                continue
            answer = mesh.run(command.text)
            try:
                check(command, answer)
            except AssertionError as e:
                raise AssertionError(f"{block.id}: $ {command.text}\n{e}") from None
    finally:
        for name in reversed(servers):
            stopped = mesh.stop(name)
            assert "Traceback" not in stopped["output"], stopped["output"]
    if len(skipped) == len(block.commands):
        pytest.skip("; ".join(sorted(set(skipped.values()))))


def test_every_not_run_entry_matches_a_documented_command() -> None:
    """An entry whose command left the docs goes too, so the list stays the truth."""
    commands = [(b.doc, c.text) for b in BLOCKS for c in b.commands]
    for entry in DATA["not_run"]:
        assert any(
            entry.get("file", doc) == doc and re.search(entry["match"], text)
            for doc, text in commands
        ), entry["match"]


def test_the_block_parser_finds_commands_outputs_and_continuations() -> None:
    body = (
        "$ grpcurl -plaintext -d '{}' \\\n    localhost:50051 x/Y\nERROR:\n  Code: NotFound\n$ ls\n"
    )
    first, second = parse_block("console", body)
    assert first.text == "grpcurl -plaintext -d '{}' localhost:50051 x/Y"
    assert first.expects_error and first.expected[1] == "  Code: NotFound"
    assert second.text == "ls" and not second.expects_error
    (only,) = parse_block("sh", "# a comment\n\nmeshllm models   # inline\n")
    assert only.text == "meshllm models   # inline"


def test_the_check_fails_on_a_wrong_exit_status_or_a_different_error() -> None:
    ok = Command("meshllm models", [])
    refused = Command("meshllm admin load x", ["meshllm: FailedPrecondition: loading 'x' failed"])
    grpc_error = Command("grpcurl ...", ["ERROR:", "  Code: InvalidArgument"])
    check(ok, {"rc": 0, "output": "demo\tctranslate2"})
    check(refused, {"rc": 1, "output": "meshllm: FailedPrecondition: loading 'x' failed: ..."})
    check(grpc_error, {"rc": 64, "output": "ERROR:\n  Code: InvalidArgument\n"})
    failing: list[tuple[Command, dict[str, Any]]] = [
        (ok, {"rc": 1, "output": "meshllm: Unavailable: ..."}),
        (ok, {"rc": None, "output": "timed out after 60 s"}),
        (ok, {"rc": 0, "output": "Traceback (most recent call last):\n  ..."}),
        (refused, {"rc": 0, "output": "x: 1 ready"}),
        (refused, {"rc": 1, "output": "meshllm: NotFound: no model 'x'"}),
        (grpc_error, {"rc": 64, "output": "ERROR:\n  Code: NotFound\n"}),
    ]
    for command, answer in failing:
        with pytest.raises(AssertionError):
            check(command, answer)
