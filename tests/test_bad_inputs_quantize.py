"""`sdtrt quantize` and `--precision int8`'s bad inputs: one clear line each, and nothing new on disk.

Each row runs the CLI in a fresh interpreter (tests/bad_input.py) on a copy of the tiny export, plain
(``export``) or quantized (``int8``). The quantize rows fail before any calibration drawing runs. An
interrupted quantize is tests/test_quantize.py's (it needs to interrupt at a chosen moment).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bad_input import BadInput, assert_one_clear_error, flip_a_byte

pytest.importorskip("nncf")

GENERATE = ("a cat", "--steps", "1", "--height", "128", "--width", "128", "-o")


@pytest.fixture
def export(tiny_export: Path, tmp_path: Path) -> Path:
    """A copy of the plain tiny export."""
    return Path(shutil.copytree(tiny_export, tmp_path / "export"))


@pytest.fixture
def int8(tiny_int8_export: Path, tmp_path: Path) -> Path:
    """A copy of the quantized tiny export."""
    return Path(shutil.copytree(tiny_int8_export, tmp_path / "int8"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


# name, how the export is damaged, the arguments after `quantize FOLDER --int8`, what the one line says
QUANTIZE_CASES = [
    ("a flipped byte", lambda e: flip_a_byte(e / "unet.onnx.data"), (), r"unet\.onnx changed since the export"),
    ("a truncated file", lambda e: _truncate(e / "unet.onnx.data"), (), r"bytes, not the \d+ the export wrote"),
    ("no manifest", lambda e: (e / "manifest.json").unlink(), (), "has no manifest.json"),
    ("no prompts file", lambda e: None, ("--prompts", "missing.txt"), "cannot read prompts from .*missing.txt"),
    (
        "an empty prompts file",
        lambda e: (e / "p.txt").write_text("\n \n"),
        ("--prompts", "{export}/p.txt"),
        "holds no prompts",
    ),
]


@pytest.mark.parametrize(("name", "damage", "more", "says"), QUANTIZE_CASES, ids=[c[0] for c in QUANTIZE_CASES])
def test_quantize_on_a_bad_export_or_prompts(export: Path, tmp_path: Path, name, damage, more, says) -> None:
    damage(export)
    argv = ("quantize", str(export), "--int8", *(arg.format(export=export) for arg in more))
    assert_one_clear_error(BadInput(name, argv, "^sdtrt: error: .*" + says), tmp_path, watch=[tmp_path])


def test_quantize_twice_needs_overwrite(int8: Path, tmp_path: Path) -> None:
    case = BadInput("quantized already", ("quantize", str(int8), "--int8"), r"quantized to int8 already .*--overwrite")
    assert_one_clear_error(case, tmp_path, watch=[tmp_path])


@pytest.mark.parametrize("backend", ["openvino", "ort-cpu"])
def test_int8_on_an_export_without_it(export: Path, tmp_path: Path, backend: str) -> None:
    argv = ("generate", str(export), *GENERATE, str(tmp_path / "cat.png"), "--precision", "int8", "--backend", backend)
    says = rf"has no int8 networks for {backend}: make them with `sdtrt quantize .* --int8`"
    assert_one_clear_error(BadInput("no int8", argv, says), tmp_path, watch=[tmp_path])


def test_bf16_on_ort_cpu(int8: Path, tmp_path: Path) -> None:
    argv = ("generate", str(int8), *GENERATE, str(tmp_path / "cat.png"), "--precision", "bf16", "--backend", "ort-cpu")
    says = r"backend ort-cpu runs at fp32 or int8, not 'bf16' \(bf16 is the openvino backend's\)"
    assert_one_clear_error(BadInput("bf16 on ort-cpu", argv, says), tmp_path, watch=[tmp_path])


def test_a_damaged_int8_ir(int8: Path, tmp_path: Path) -> None:
    (ir,) = int8.glob("unet.int8-*.bin")
    _truncate(ir)
    argv = ("generate", str(int8), *GENERATE, str(tmp_path / "cat.png"), "--precision", "int8")
    says = rf"{ir.name} is \d+ bytes, not the \d+ the export wrote"
    assert_one_clear_error(BadInput("damaged IR", argv, says), tmp_path, watch=[tmp_path])


def test_lora_at_int8(int8: Path, tmp_path: Path) -> None:
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    argv = (
        "generate",
        str(int8),
        *GENERATE,
        str(tmp_path / "cat.png"),
        "--precision",
        "int8",
        "--lora",
        str(lora),
        "-q",
    )
    says = r"LoRA cannot change .*unet.* at --precision int8 .*: load it at --precision bf16 or fp32"
    assert_one_clear_error(BadInput("LoRA at int8", argv, says), tmp_path, watch=[tmp_path])
