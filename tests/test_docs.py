"""Every shell and Python block of the README and docs/*.md runs in a test, or says why it cannot (tests/doc_blocks.py
has the markers): a new block without a marker fails here.

The blocks marked ``run by tests/test_docs.py`` run as written: a page's blocks in order, in one fresh folder per
page, ``sdtrt`` and ``python`` being this interpreter's (``python -m benchmarks.run`` finds the repository's
benchmarks), after the test put each file their marker names in place (SETUPS below) and replaced the text it
names (`--model tiny` for `--model sd15`: the tiny benchmark preset for the SD-1.5-shaped one). Each must exit 0
and write what it says it writes (``-o FILE``, ``--out PATH``, ``.save("FILE")``). The Serving page's client examples
each run alone against a real `sdtrt serve` of the demo model, and must write the PNGs they say they write."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from doc_blocks import ALL, ROOT, Block
from doc_blocks import blocks as doc_blocks
from PIL import Image, ImageDraw

DOCS_PORT = 7860  # the address the client examples are written for


def _copy(fixture: str) -> Callable[[pytest.FixtureRequest, Path], None]:
    """A copy of a session fixture's export: the blocks write into exports (caches, attached networks)."""
    return lambda request, dest: shutil.copytree(request.getfixturevalue(fixture), dest)


def _demo_model(request: pytest.FixtureRequest, dest: Path) -> None:
    from sdtrt.demo import demo_model_dir

    dest.symlink_to(demo_model_dir(), target_is_directory=True)


def _demo_controlnet(request: pytest.FixtureRequest, dest: Path) -> None:
    dest.symlink_to(ROOT / "export" / "assets" / "tiny-controlnet", target_is_directory=True)


def _picture(request: pytest.FixtureRequest, dest: Path) -> None:
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(255, 0, 0))
    image.save(dest)


def _mask(request: pytest.FixtureRequest, dest: Path) -> None:
    image = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill=255)
    image.save(dest)


def _demo_lora(request: pytest.FixtureRequest, dest: Path) -> None:
    """A random rank-4 kohya LoRA on the demo model's attention projections, seeded by its file name."""
    from benchmarks.lora_swap import TEXT_TARGETS, UNET_TARGETS, write_kohya
    from sdtrt.engine.artifact import open_artifact

    maps = open_artifact(request.getfixturevalue("demo_export"), "ort-cpu").weight_maps()
    seed = zlib.crc32(dest.name.encode())
    write_kohya(dest, maps, 4, seed, {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS})


def _prompts(request: pytest.FixtureRequest, dest: Path) -> None:
    dest.write_text("a red circle on a blue background\na photograph of an astronaut riding a horse\n")


def _tiny_sdxl(refiner: bool) -> Callable[[pytest.FixtureRequest, Path], None]:
    """The tiny SDXL base model (or its refiner) of export/tiny.py, exported."""

    def setup(request: pytest.FixtureRequest, dest: Path) -> None:
        from sdtrt.export.exporter import export_model
        from sdtrt.export.tiny import build_tiny_sdxl

        model = build_tiny_sdxl(dest.parent / f".{dest.name}-model", refiner=refiner)
        export_model(model, dest, progress=False)

    return setup


def _tiny_vae(request: pytest.FixtureRequest, dest: Path) -> None:
    from sdtrt.export.tiny import build_tiny_taesd

    build_tiny_taesd(dest)


SETUPS: dict[str, Callable[[pytest.FixtureRequest, Path], None]] = {
    "the demo model's export": _copy("demo_export"),  # 64x64, fp32 and fp16
    "the tiny test model's export": _copy("tiny_export"),  # 256x256, random weights, fp32 and fp16
    "the tiny upscaler's export": _copy("tiny_upscaler_export"),
    "the demo model": _demo_model,  # the shipped diffusers folder
    "the demo ControlNet": _demo_controlnet,
    "a picture": _picture,  # 64x64 RGB
    "a mask": _mask,  # 64x64, white where it repaints
    "a LoRA of the demo model": _demo_lora,
    "a list of prompts": _prompts,
    "a tiny VAE": _tiny_vae,  # a random-weight AutoencoderTiny folder
    "the tiny SDXL model's export": _tiny_sdxl(refiner=False),
    "the tiny SDXL refiner's export": _tiny_sdxl(refiner=True),
}


def test_every_block_runs_in_a_test_or_says_why_not() -> None:
    problems = [f"{block.where}: {problem}" for block in ALL if (problem := block.problem(set(SETUPS)))]
    assert not problems, "\n".join(problems)


def test_the_rule_catches_a_block_that_is_neither_run_nor_marked(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "```sh\nsdtrt generate artifacts/sd15 'a cat'\n```\n\n"  # unmarked
        "<!-- needs a GPU: TensorRT -->\n```sh\nsdtrt build artifacts/sd15\n```\n\n"
        "```text\nmanifest.json\n```\n\n"
        "- a list item:\n\n  <!-- run by tests/test_docs.py, with `m` as a picture; `x` for `y` -->\n"
        "  ```python\n  print(1)\n  ```\n\n"
        "<!-- run by tests/test_docs.py, with `m` as a unicorn -->\n```python\nprint(1)\n```\n\n"
        "<!-- needs a GPU -->\n```sh\nsdtrt build artifacts/sd15\n```\n",  # no reason given
        encoding="utf-8",
    )
    found = [(block.line, block.problem(set(SETUPS))) for block in doc_blocks(page)]
    assert [line for line, problem in found if problem] == [1, 17, 22, 27]
    assert found[3][1] == "the marker replaces ['y'], which the block does not hold"
    assert "no setup called ['a unicorn']" in found[4][1]


def _writes(code: str) -> list[str]:
    """The paths a block says it writes (its comments left out)."""
    code = re.sub(r"(^|\s)#.*$", "", code, flags=re.MULTILINE)
    return re.findall(r"(?:^|\s)(?:-o|--out) ([^\s\\]+)|\.save\(\"([^\"]+)\"\)", code)


def _shims(folder: Path) -> dict[str, str]:
    """The environment of a page's blocks: `sdtrt` and `python` are this interpreter's."""
    bin_dir = folder / ".bin"
    bin_dir.mkdir()
    for name, command in (("sdtrt", f'"{sys.executable}" -m sdtrt'), ("python", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": pythonpath}


def _run(block: Block, folder: Path, env: dict[str, str], request: pytest.FixtureRequest) -> None:
    for path, thing in block.places.items():
        dest = folder / path
        if not os.path.lexists(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            SETUPS[thing](request, dest)
    code = block.code
    for old, new in block.replaces.items():  # each found in the block: test_every_block_runs_in_a_test_or_says_why_not
        code = code.replace(old, new)
    command = ["bash", "-euo", "pipefail", "-c", code] if block.language != "python" else [sys.executable, "-c", code]
    run = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"{block.where} failed:\n{run.stdout}\n{run.stderr}"
    for written in (a or b for a, b in _writes(code)):
        assert (folder / written).exists(), f"{block.where} did not write {written}"


def _pages(slow: bool) -> list[str]:
    """The pages with blocks to run in `make test` (slow=False) or under `pytest -m slow` (slow=True)."""
    pages = {str(b.page.relative_to(ROOT)) for b in ALL if b.runs and not b.server and b.slow == slow}
    return sorted(pages)


def _run_page(page: str, slow: bool, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    env = _shims(tmp_path)
    for block in ALL:
        if str(block.page.relative_to(ROOT)) == page and block.runs and not block.server and (slow or not block.slow):
            _run(block, tmp_path, env, request)


@pytest.mark.parametrize("page", _pages(slow=False))
def test_a_page_runs_as_written(page: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    _run_page(page, False, tmp_path, request)


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages(slow=True))
def test_a_page_runs_as_written_slow(page: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The page's slow blocks, after its other blocks (which they may build on)."""
    _run_page(page, True, tmp_path, request)


# The Serving page's client examples: each alone, against a server of the demo model

EXAMPLES = [block for block in ALL if block.server]


@pytest.fixture(scope="module")
def server(demo_export: Path) -> Iterator[object]:
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from benchmarks.serving import ServerProcess

    proc = ServerProcess([str(demo_export), "--backend", "ort-cpu"])
    yield proc
    proc.close()


def test_the_serving_page_has_its_client_examples() -> None:
    """curl, httpx, openai, webuiapi and curl following a request's progress: a marker that lost its block (or a block
    its marker) fails here."""
    assert [(block.page.name, block.language) for block in EXAMPLES] == [
        ("serving.md", "sh"),
        ("serving.md", "python"),
        ("serving.md", "python"),
        ("serving.md", "python"),
        ("serving.md", "sh"),
    ]


@pytest.mark.parametrize("block", EXAMPLES, ids=[f"example-{i}" for i in range(len(EXAMPLES))])
def test_a_serving_example_runs_as_written(block: Block, server, tmp_path: Path) -> None:
    code = block.code
    for module in re.findall(r"^(?:from|import) (\w+)", code, re.MULTILINE):
        pytest.importorskip(module)  # openai and webuiapi come with the dev extra
    code = code.replace(f"http://127.0.0.1:{DOCS_PORT}", server.url).replace(f"port={DOCS_PORT}", f"port={server.port}")
    command = ["bash", "-euo", "pipefail", "-c", code] if block.language == "sh" else [sys.executable, "-c", code]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    pictures = sorted(tmp_path.iterdir())
    assert pictures, f"the example wrote nothing: {run.stdout}"
    for path in pictures:  # each a picture of the demo model's native size
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64), path.name
    for name in re.findall(r"[\"' ]([\w-]+\.png)", code):  # and the files it names
        assert (tmp_path / name).is_file(), name
