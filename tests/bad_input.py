"""The bad-input suites' one check: a command a user types fails as a user expects.

Each row of a table in tests/test_bad_inputs_*.py runs the CLI in a fresh interpreter (so that
nothing a test imported can hide a failure) and asserts: the exit code, exactly one line on
stderr that says what went wrong, no traceback anywhere, and nothing new on disk where the
command wrote (``watch``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROGRESS_BAR = re.compile(r"^\s*[\w ]+:\s+\d+%\|")  # a tqdm bar's fragment ("denoise:  50%|#####  | 1/2")


@dataclass(frozen=True)
class BadInput:
    """One row: the CLI's arguments, the exit code and a regex the one error line must match."""

    name: str
    argv: tuple[str, ...]
    message: str
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)


def flip_a_byte(path: Path, at: int = 1000) -> None:
    """Damage ``path`` in place, keeping its size: only a full read (sdtrt verify, a sha256) sees it."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def files_under(folder: Path) -> set[Path]:
    """Every file and folder below ``folder``, hidden ones included."""
    return set(folder.rglob("*")) if folder.exists() else set()


def run_cli(argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdtrt", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def assert_one_clear_error(case: BadInput, cwd: Path, watch: Sequence[Path] = ()) -> str:
    """Run ``case`` and assert how it fails; returns the error line."""
    before = {folder: files_under(folder) for folder in watch}
    result = run_cli(case.argv, cwd, case.env)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, f"{case.name}: a traceback reached the user:\n{output}"
    assert result.returncode == case.code, f"{case.name}: exit {result.returncode}, expected {case.code}\n{output}"
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_BAR.match(line)]
    assert len(lines) == 1, f"{case.name}: expected one error line, got:\n{result.stderr}"
    assert re.search(case.message, lines[0]), f"{case.name}: {lines[0]!r} does not match {case.message!r}"
    for folder, files in before.items():
        left = sorted(str(p) for p in files_under(folder) - files)
        assert not left, f"{case.name}: left on disk: {left}"
    return lines[0]
