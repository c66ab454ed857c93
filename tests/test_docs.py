"""The documentation's client examples run as written: each code block of docs/serving.md that follows the marker
comment ``<!-- run by tests/test_docs.py ... -->`` runs in a fresh folder against a real `sdtrt serve` of the demo
model (its address put in place of http://127.0.0.1:7860) and must write the PNGs it says it writes."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from PIL import Image

from benchmarks.serving import ServerProcess

DOCS = Path(__file__).resolve().parents[1] / "docs"
EXAMPLE = re.compile(r"^<!-- run by tests/test_docs\.py[^>]*-->\n```(sh|python)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
EXAMPLES = [match.groups() for match in EXAMPLE.finditer((DOCS / "serving.md").read_text(encoding="utf-8"))]
DOCS_PORT = 7860  # the address the examples are written for


@pytest.fixture(scope="module")
def server(demo_export: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess([str(demo_export), "--backend", "ort-cpu"])
    yield proc
    proc.close()


def test_the_serving_page_has_its_client_examples() -> None:
    """curl, httpx, openai, webuiapi and curl following a request's progress: a marker that lost its block (or a block
    its marker) fails here."""
    assert [language for language, _ in EXAMPLES] == ["sh", "python", "python", "python", "sh"]


@pytest.mark.parametrize(("language", "code"), EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_a_serving_example_runs_as_written(language: str, code: str, server: ServerProcess, tmp_path: Path) -> None:
    for module in re.findall(r"^(?:from|import) (\w+)", code, re.MULTILINE):
        pytest.importorskip(module)  # openai and webuiapi come with the dev extra
    code = code.replace(f"http://127.0.0.1:{DOCS_PORT}", server.url).replace(f"port={DOCS_PORT}", f"port={server.port}")
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "sh" else [sys.executable, "-c", code]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    pictures = sorted(tmp_path.iterdir())
    assert pictures, f"the example wrote nothing: {run.stdout}"
    for path in pictures:  # each a picture of the demo model's native size
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64), path.name
    for name in re.findall(r"[\"' ]([\w-]+\.png)", code):  # and the files it names
        assert (tmp_path / name).is_file(), name
