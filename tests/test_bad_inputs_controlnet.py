"""`sdtrt add-controlnet` given what is not a ControlNet, or pickled weights; and what a successful attach leaves.

Each row runs the CLI in a fresh interpreter (tests/bad_input.py): one line saying what was given and what is
expected, before any conversion or download and without the libraries' own warnings; nothing in the export
changes. A ControlNet whose weights are pickles attaches only with --allow-pickle; an attach leaves no lock file
behind, and the export stays sdtrt's own: `sdtrt export --overwrite` may replace it, `sdtrt verify` says ok.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bad_input import BadInput, assert_one_clear_error, run_cli

from sdtrt.engine.fsutil import LOCK_NAME

EXPECTED = "add-controlnet takes a diffusers ControlNetModel folder, its hub id, or a ControlNet .safetensors file"


@pytest.fixture
def export(tiny_export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_export, tmp_path / "export"))


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdtrt.export.tiny import build_tiny_controlnet

    return build_tiny_controlnet(tmp_path_factory.mktemp("controlnets") / "edges", seed=1)


def _lora_file(model: Path, controlnet: Path, folder: Path) -> Path:
    from safetensors.numpy import save_file

    path = folder / "style.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{key}.lora_down.weight": np.zeros((4, 32), np.float32)}, str(path))
    return path


def _pickled_controlnet(controlnet: Path, folder: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    pickled = Path(shutil.copytree(controlnet, folder / "pickled"))
    weights = pickled / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "diffusion_pytorch_model.bin")
    weights.unlink()
    return pickled


# name, (the tiny model, the ControlNet, a scratch folder) -> what add-controlnet is given, the one line's regex
Given = Callable[[Path, Path, Path], Path]
CASES: list[tuple[str, Given, str]] = [
    ("a UNet folder", lambda model, cn, tmp: model / "unet", r"unet holds a UNet2DConditionModel, not a ControlNet"),
    (
        "a text encoder folder",
        lambda model, cn, tmp: model / "text_encoder",
        r"holds a CLIPTextModel, not a ControlNet",
    ),
    ("a whole pipeline", lambda model, cn, tmp: model, r"is a diffusers pipeline folder, not a ControlNet"),
    ("a LoRA file", _lora_file, r"style\.safetensors holds a LoRA adapter \(none of a ControlNet's keys\)"),
    (
        "a folder without a config",
        lambda model, cn, tmp: tmp,
        r"is not a diffusers ControlNet folder \(no config\.json\)",
    ),
    (
        "pickled ControlNet weights",
        lambda model, cn, tmp: _pickled_controlnet(cn, tmp),
        r"diffusion_pytorch_model\.bin holds pickled weights; unpickling can run arbitrary code hidden in it: "
        r"convert it to \.safetensors, or pass --allow-pickle",
    ),
]


@pytest.mark.parametrize(("name", "given", "message"), CASES, ids=[case[0] for case in CASES])
def test_what_is_not_a_controlnet_is_one_line(
    export: Path, tiny_model_dir: Path, controlnet: Path, tmp_path: Path, name: str, given: Given, message: str
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    source = given(tiny_model_dir, controlnet, scratch)
    before = {p: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    rest = "" if name == "pickled ControlNet weights" else f"; {EXPECTED}$"
    case = BadInput(name, ("add-controlnet", str(export), str(source)), "^sdtrt: error: .*" + message + rest)
    assert_one_clear_error(case, tmp_path, watch=[tmp_path])
    assert {p: p.read_bytes() for p in export.rglob("*") if p.is_file()} == before


def test_pickled_weights_attach_when_allowed_and_leave_an_export_sdtrt_may_replace(
    export: Path, tiny_model_dir: Path, controlnet: Path, tmp_path: Path
) -> None:
    pickled = _pickled_controlnet(controlnet, tmp_path)
    done = run_cli(["add-controlnet", str(export), str(pickled), "--name", "edges", "--allow-pickle", "-q"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert not (export / LOCK_NAME).exists()  # the scratch folder's owner lock stays in the scratch folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]  # nor is a scratch folder left
    verified = run_cli(["verify", str(export)], tmp_path)
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    again = run_cli(["export", str(tiny_model_dir), "--out", str(export), "--overwrite", "-q"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert not list(export.glob("controlnet.*"))  # replaced by a plain export


def test_an_export_with_a_lock_file_an_earlier_attach_left_may_be_replaced(
    export: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    (export / LOCK_NAME).write_text('{"pid": 1, "host": "h"}')
    again = run_cli(["export", str(tiny_model_dir), "--out", str(export), "--overwrite", "-q"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert not (export / LOCK_NAME).exists()


def test_a_model_folder_with_pickled_weights_exports_only_when_allowed(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    message = r"^sdtrt: error: .*vae/diffusion_pytorch_model\.bin holds pickled weights; .*--allow-pickle"
    case = BadInput("pickled VAE", ("export", str(model), "--out", str(tmp_path / "out")), message)
    assert_one_clear_error(case, tmp_path, watch=[tmp_path])
    allowed = run_cli(["export", str(model), "--out", str(tmp_path / "out"), "--allow-pickle", "-q"], tmp_path)
    assert allowed.returncode == 0, allowed.stderr
