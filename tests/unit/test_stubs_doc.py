"""docs/stubs.md shows only tested code: each of its code blocks is a region of an example file
(or of a test) marked ``[START name]`` … ``[END name]``, copied verbatim.

In the doc, a block follows its source: ``<!-- snippet: examples/stubs/node/x.js#stream -->``.
After editing an example, ``python tests/unit/test_stubs_doc.py`` rewrites the doc's copies.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "stubs.md"
SOURCES = (
    "examples/stubs/python/meshllm_stubs_example.py",
    "examples/stubs/python/meshllm_stubs_aio_example.py",
    "examples/stubs/node/meshllm_stubs_example.js",
    "tests/unit/test_stubs_grpc_testing.py",
)
MARK = re.compile(r"^\s*(?:#|//) \[(START|END) (\w+)\]\s*$")
SNIPPET = re.compile(
    r"^<!-- snippet: (?P<source>\S+)#(?P<name>\w+) -->\n```(?P<lang>\w+)\n(?P<code>.*?)^```$",
    re.M | re.S,
)
CODE_LANGS = {"python", "js", "javascript", "ts", "go", "java"}


def regions(source: str) -> dict[str, str]:
    """``name -> code`` for each marked region of ``source`` (blank lines at its ends dropped)."""
    found: dict[str, str] = {}
    open_name, lines = "", list[str]()
    for line in (ROOT / source).read_text().splitlines():
        mark = MARK.match(line)
        if mark is None:
            if open_name:
                lines.append(line)
            continue
        kind, name = mark.groups()
        if kind == "START":
            assert not open_name, f"{source}: region {name} starts inside {open_name}"
            open_name, lines = name, []
        else:
            assert name == open_name, f"{source}: END {name} closes {open_name or 'nothing'}"
            assert name not in found, f"{source}: region {name} marked twice"
            found[name] = "\n".join(lines).strip("\n") + "\n"
            open_name = ""
    assert not open_name, f"{source}: region {open_name} never ends"
    return found


def all_regions() -> dict[tuple[str, str], str]:
    return {(s, name): code for s in SOURCES for name, code in regions(s).items()}


def refreshed(doc: str, known: dict[tuple[str, str], str]) -> str:
    def fill(m: re.Match[str]) -> str:
        code = known[(m["source"], m["name"])]
        return f"<!-- snippet: {m['source']}#{m['name']} -->\n```{m['lang']}\n{code}```"

    return SNIPPET.sub(fill, doc)


def test_every_snippet_equals_its_region_of_the_example() -> None:
    doc, known = DOC.read_text(), all_regions()
    shown = [(m["source"], m["name"]) for m in SNIPPET.finditer(doc)]
    assert shown, "docs/stubs.md includes no snippet"
    unknown = [f"{s}#{n}" for s, n in shown if (s, n) not in known]
    assert not unknown, f"snippets with no such region: {unknown}"
    stale = [
        f"{m['source']}#{m['name']}"
        for m in SNIPPET.finditer(doc)
        if m["code"] != known[(m["source"], m["name"])]
    ]
    assert not stale, f"stale copies in docs/stubs.md (python {__file__} rewrites them): {stale}"


def test_every_region_is_shown_and_no_code_block_is_an_untested_copy() -> None:
    doc, known = DOC.read_text(), all_regions()
    shown = {(m["source"], m["name"]) for m in SNIPPET.finditer(doc)}
    assert set(known) - shown == set(), "regions docs/stubs.md does not show"
    without_source = SNIPPET.sub("", doc)
    langs = re.findall(r"^```(\w+)$", without_source, re.M)
    untested = [lang for lang in langs if lang in CODE_LANGS]
    assert not untested, f"code blocks in docs/stubs.md that are no example's region: {untested}"


def test_a_changed_example_makes_the_copy_stale() -> None:
    doc, known = DOC.read_text(), all_regions()
    key = next(iter(known))
    changed = {**known, key: known[key] + "# changed\n"}
    assert refreshed(doc, changed) != doc and refreshed(doc, known) == doc


if __name__ == "__main__":
    DOC.write_text(refreshed(DOC.read_text(), all_regions()))
    sys.exit(0)
