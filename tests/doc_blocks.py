"""The code blocks of the README and docs/*.md, and what the HTML comment on the line before each says about it.

Every block is one of (the comment renders as nothing in the site):

- ``<!-- run by tests/test_docs.py against a server of the demo model -->``: a client example, run in a fresh folder
  against `sdtrt serve` of the demo model (its address put in place of http://127.0.0.1:7860);
- ``<!-- run by tests/test_docs.py[, slow][, with SETUP; SETUP ...] -->``: run as written, in order with the page's
  other such blocks, in one fresh folder per page; ``slow`` ones only under ``pytest -m slow``, which runs the page's
  other blocks first. A SETUP is ```PATH` as THING``: the test puts THING (a name in tests/test_docs.py's SETUPS)
  at PATH in that folder before the block runs, or ```NEW` for `OLD```: the test runs the block with the text OLD
  replaced by NEW (e.g. the tiny benchmark preset for the SD-1.5-shaped one);
- ``<!-- needs WHAT: WHY -->``: not run, because it needs what no test machine has (a GPU, TensorRT, downloaded
  weights, a cluster of machines, hours), and says why;
- ``<!-- not a command: WHAT -->``, or a block whose language says it is not a command (``text``, ``json``, ...).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_COMMANDS = {"text", "json", "yaml", "toml"}  # languages of output, files and layouts
COMMANDS = {"sh": "sh", "bash": "sh", "python": "python"}  # the languages a test can run, and how

FENCE = re.compile(r"^( *)```(\S*)[^\n]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
RUN = re.compile(
    r"run by tests/test_docs\.py(?P<slow>, slow)?"
    r"(?:, with (?P<setups>.+)| (?P<server>against a server of the demo model))?\Z"
)
PLACE = re.compile(r"`(?P<path>[^`]+)` as (?P<thing>[^;`]+)\Z")
REPLACE = re.compile(r"`(?P<new>[^`]+)` for `(?P<old>[^`]+)`\Z")
NEEDS = re.compile(r"needs (?P<what>[^:]+): (?P<why>\S.*)\Z", re.DOTALL)
NOT_A_COMMAND = re.compile(r"not a command: \S.*\Z", re.DOTALL)


@dataclass
class Block:
    """One fenced block: where it is, its language and code (unindented), and the comment before it ('' if none)."""

    page: Path
    line: int
    language: str
    code: str
    marker: str
    places: dict[str, str] = field(default_factory=dict)  # path in the run's folder -> SETUPS name
    replaces: dict[str, str] = field(default_factory=dict)  # old text -> new text
    slow: bool = False
    server: bool = False

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return bool(RUN.match(self.marker))

    def problem(self, setups: set[str]) -> str | None:
        """Why this block breaks the rule above, or None."""
        if self.language in NOT_COMMANDS:
            return None
        if not self.marker:
            return (
                f"a {self.language or 'plain'} block without a marker: run it in tests/test_docs.py or mark it "
                "(see tests/doc_blocks.py)"
            )
        if NEEDS.match(self.marker) or NOT_A_COMMAND.match(self.marker):
            return None
        if not self.runs:
            return f"a marker this test does not know: <!-- {self.marker} -->"
        if self.language not in COMMANDS:
            return f"a block marked to run, in a language the test cannot run: {self.language!r}"
        if unknown := sorted(set(self.places.values()) - setups):
            return f"no setup called {unknown} (tests/test_docs.py's SETUPS: {sorted(setups)})"
        if missing := [old for old in self.replaces if old not in self.code]:
            return f"the marker replaces {missing}, which the block does not hold"
        return None


def _parse_run(block: Block) -> None:
    match = RUN.match(block.marker)
    if match is None:
        return
    block.slow, block.server = bool(match["slow"]), bool(match["server"])
    for setup in filter(None, (s.strip() for s in (match["setups"] or "").split(";"))):
        if place := PLACE.match(setup):
            block.places[place["path"]] = place["thing"].strip()
        elif replace := REPLACE.match(setup):
            block.replaces[replace["old"]] = replace["new"]
        else:
            block.places[setup] = "?"  # reported by problem() as an unknown setup


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        head = text[: match.start()].rstrip()
        start = head.rfind("<!--")
        comment = head.endswith("-->") and start >= 0 and not head[:start].rsplit("\n", 1)[-1].strip()
        block = Block(
            page=page,
            line=text.count("\n", 0, match.start()) + 1,
            language=match[2],
            code=textwrap.dedent(match[3]),
            marker=" ".join(head[start + 4 : -3].split()) if comment else "",
        )
        _parse_run(block)
        found.append(block)
    return found


ALL = [block for page in PAGES for block in blocks(page)]
