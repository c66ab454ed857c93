"""The command line's own bad inputs: `sdtrt verify`, an -o that cannot be written, and --debug.

Each row runs the CLI in a fresh interpreter (tests/bad_input.py). An -o that cannot be written
must fail before the pipeline loads: no denoising step runs, and the error names the user's path.
Tests run as root, where permission bits stop no write: the unwritable cases fail for root too.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import bad_input
import pytest
from bad_input import BadInput, assert_one_clear_error, flip_a_byte, run_cli

GENERATE = ("--steps", "1", "--height", "128", "--width", "128")


@pytest.fixture
def export(tiny_export: Path, tmp_path: Path) -> Path:
    """A full copy of the tiny export that a test may damage."""
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    return folder


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.CompletedProcess]:
    """Every CLI run assert_one_clear_error makes, for what it does not check itself (stderr beyond its line)."""
    done: list[subprocess.CompletedProcess] = []

    def spy(*args: object, **kwargs: object) -> subprocess.CompletedProcess:
        done.append(run_cli(*args, **kwargs))
        return done[-1]

    monkeypatch.setattr(bad_input, "run_cli", spy)
    return done


# --- sdtrt verify -------------------------------------------------------------------------------------


def test_verify_a_good_export(export: Path, tmp_path: Path) -> None:
    result = run_cli(["verify", str(export)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{export}: ok (12 files)"  # 8 .onnx, 4 with external data
    assert result.stderr == ""


def test_verify_finds_a_flipped_byte(export: Path, tmp_path: Path) -> None:
    flip_a_byte(export / "unet.onnx.data")  # same size: loading cannot see it, a full read can
    named = re.escape(f"{export / 'unet.onnx.data'} changed since the export")
    message = named + r".*; rebuild the export with: sdtrt export \S+ --out " + re.escape(f"{export} --overwrite")
    case = BadInput("verify, flipped byte", ("verify", str(export)), message)
    assert_one_clear_error(case, tmp_path, watch=[tmp_path])


def test_verify_names_each_problem_on_its_own_line(export: Path, tmp_path: Path) -> None:
    flip_a_byte(export / "unet.onnx.data")
    (export / "text_encoder.fp16.onnx.data").unlink()
    result = run_cli(["verify", str(export)], tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert "text_encoder.fp16.onnx.data named in the manifest is missing" in lines[0]
    assert "unet.onnx.data changed since the export" in lines[1]


# --- an -o that cannot be written ---------------------------------------------------------------------

# name, -o relative to tmp_path (or absolute), the path the error names (the same unless given), what it says
OUT_CASES = [
    ("a folder", "pictures", None, "it is a folder"),
    ("under a file", "notes.txt/cat.png", None, r"notes\.txt is a file, not a folder"),
    ("deep under a file", "notes.txt/a/b/cat.png", None, r"notes\.txt is a file, not a folder"),
    ("a folder that takes no files", "/proc/sdtrt-test/cat.png", None, "/proc takes no new files"),
    ("one of several images is a folder", "cat.png --num-images 2", "cat-1.png", "it is a folder"),
]


@pytest.mark.parametrize(("name", "out", "names", "says"), OUT_CASES, ids=[case[0] for case in OUT_CASES])
def test_an_unwritable_out_fails_before_any_step(
    export: Path,
    tmp_path: Path,
    runs: list[subprocess.CompletedProcess],
    name: str,
    out: str,
    names: str | None,
    says: str,
) -> None:
    work = tmp_path / "work"
    (work / "pictures").mkdir(parents=True)
    (work / "cat-1.png").mkdir()
    (work / "notes.txt").write_text("a file")
    path, *more = out.split()
    named = work / (names or path)  # an absolute path stays itself
    argv = ("generate", str(export), "a cat", *GENERATE, "-o", str(work / path), *more)
    message = "^sdtrt: error: " + re.escape(f"cannot write {named}: ") + ".*" + says
    assert_one_clear_error(BadInput(name, argv, message), tmp_path, watch=[tmp_path])
    assert "denoise" not in runs[-1].stderr  # the check came before the pipeline, not after every step


# --- --debug ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_chained_traceback(export: Path, tmp_path: Path, where: str) -> None:
    truncated = export / "unet.onnx"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    manifest = json.loads((export / "manifest.json").read_text())
    for component in manifest["components"].values():
        for file in component["files"].values():
            del file["size"], file["data_size"]  # a manifest of before sizes were recorded: the session finds it
    (export / "manifest.json").write_text(json.dumps(manifest))
    argv = ["generate", str(export), "a cat", *GENERATE, "-q", "--backend", "ort-cpu"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    result = run_cli(argv, tmp_path)
    assert result.returncode == 2
    first, *rest = result.stderr.splitlines()
    assert first.startswith(f"sdtrt: error: ort-cpu cannot load {truncated}: ")
    traceback = "\n".join(rest)
    assert traceback.startswith("Traceback (most recent call last):")
    assert "InvalidProtobuf" in traceback  # ONNX Runtime's own exception, the cause
    assert "The above exception was the direct cause of the following exception" in traceback
    assert traceback.rstrip().splitlines()[-1].startswith("sdtrt.engine.errors.ManifestError: ")

    without = run_cli([a for a in argv if a != "--debug"], tmp_path)
    assert without.returncode == 2 and without.stderr == first + "\n"  # the same line, no traceback
