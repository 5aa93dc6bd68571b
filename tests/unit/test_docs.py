"""Claims in the docs checked against the code: every ErrorInfo reason a server sends is in
docs/errors.md, the retried codes the docs list are the client's, and the router's reflection
list is the one the README shows. (Commands in the docs run in tests/e2e/test_doc_commands.py.)"""

from __future__ import annotations

import re
from pathlib import Path

from meshllm.client._retry import TRANSIENT

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = [ROOT / part / "src" for part in ("protos", "server", "client", "router", "replica")]
REASON = re.compile(r'reason\s*=\s*"([A-Z][A-Z_]+)"')
REASON_CONSTANT = re.compile(r"reason\s*=\s*([A-Z][A-Z_]+)\b")
CONSTANT = re.compile(r'^([A-Z][A-Z_]+) = "([A-Z][A-Z_]+)"$', re.M)


def reasons_in_code() -> set[str]:
    """``reason="X"`` literals, and ``reason=NAME`` where the module sets ``NAME = "X"``."""
    found = set()
    for src in LIBRARY:
        for path in src.rglob("*.py"):
            if "_pb2" not in path.name:
                text = path.read_text()
                constants = dict(CONSTANT.findall(text))
                found |= set(REASON.findall(text))
                found |= {constants[n] for n in REASON_CONSTANT.findall(text) if n in constants}
    return found


def test_every_error_reason_the_code_sends_is_in_docs_errors_md() -> None:
    reasons = reasons_in_code()
    assert {"MODEL_NOT_LOADED", "MODEL_LOAD_FAILED", "REPLICA_REMOVED"} <= reasons  # the scan works
    documented = set(re.findall(r"`([A-Z][A-Z_]+)`", (ROOT / "docs" / "errors.md").read_text()))
    assert sorted(reasons - documented) == []


def test_errors_md_says_a_catalog_model_loaded_nowhere_is_failed_precondition() -> None:
    text = (ROOT / "docs" / "errors.md").read_text()
    row = next(line for line in text.splitlines() if "catalog model loaded on no replica" in line)
    assert "FAILED_PRECONDITION" in row and "MODEL_NOT_LOADED" in row


def retried_lists(text: str) -> list[set[str]]:
    """The status codes of each "Retried: ... Never retried" span and "transient failures (...)"."""
    spans = re.findall(r"Retried:(.*?)Never retried", text, re.S)
    spans += re.findall(r"transient (?:failures|error) \(([^)]*)\)", text)
    codes = re.compile(r"\b(UNAVAILABLE|RESOURCE_EXHAUSTED|DEADLINE_EXCEEDED|ABORTED|INTERNAL)\b")
    return [set(codes.findall(span)) for span in spans]


def test_the_retried_codes_in_the_docs_are_the_clients() -> None:
    transient = {code.name for code in TRANSIENT}
    lists = [
        codes
        for doc in ("README.md", "docs/client.md")
        for codes in retried_lists((ROOT / doc).read_text())
    ]
    assert len(lists) >= 3
    assert all(codes == transient for codes in lists), lists


def test_the_readme_lists_the_routers_reflected_services() -> None:
    from meshllm.router import server

    source = Path(server.__file__).read_text()
    assert "(GENERATION, ADMIN, HEALTH, reflection.SERVICE_NAME)" in source
    assert (
        "its `list` shows `Admin`, `Generation`, health and\nreflection"
        in (ROOT / "README.md").read_text()
    )


def test_the_readme_no_longer_calls_admin_load_control_unimplemented() -> None:
    text = (ROOT / "README.md").read_text()
    assert "open issue" not in text and "implements it later" not in text
