"""The shipped demo model draws what it is asked, through export, engine and runtime, on every backend present.

The model (export/assets/tiny-sd, trained by train/tiny.py) knows one coloured shape on a coloured
background. Its pictures are judged by pixel statistics (train.shapes.dominant_colours): the
background is the commonest palette colour on the border, the shape the commonest other colour
around the centre of mass of the rest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrt.cli import main
from sdtrt.demo import DEMO_GRID_PROMPTS, demo_model_dir
from sdtrt.engine.backends import BACKENDS
from sdtrt.engine.errors import BackendUnavailableError
from sdtrt.runtime.pipeline import Pipeline
from train import shapes

# (prompt, shape colour, background colour): every colour as a shape and as a background, in every caption form
CASES = [
    ("a red circle on a blue background", "red", "blue"),
    ("a yellow square on a black background, top left", "yellow", "black"),
    ("a small green triangle on a white background, bottom right", "green", "white"),
    ("a large blue circle on a yellow background, top right", "blue", "yellow"),
    ("a white square on a red background, center", "white", "red"),
    ("a black triangle on a green background", "black", "green"),
    ("a large red square on a white background", "red", "white"),
    ("a small yellow circle on a blue background, bottom left", "yellow", "blue"),
    ("a green circle on a black background, center", "green", "black"),
    ("a blue triangle on a white background, top left", "blue", "white"),
    ("a white circle on a green background, bottom right", "white", "green"),
    ("a black square on a yellow background, top right", "black", "yellow"),
]
STEPS = 20
GUIDANCE = 5.0
MIN_ACCURACY = 0.9
MAX_SHIPPED_MB = 20


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo model exported once per test session, fp32 and fp16."""
    from sdtrt.export.exporter import export_model

    out = tmp_path_factory.mktemp("exports") / "tiny-sd"
    export_model(demo_model_dir(), out, precisions=("fp32", "fp16"), progress=False)
    return out


@pytest.fixture(scope="module", params=list(BACKENDS))
def pipe(request: pytest.FixtureRequest, trained_export: Path) -> Pipeline:
    try:
        pipeline = Pipeline.load(trained_export, backend=request.param)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    with pipeline:
        yield pipeline


def _draw(pipe: Pipeline, prompt: str, seed: int) -> np.ndarray:
    """(64, 64, 3) uint8."""
    result = pipe.txt2img(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=seed)
    return np.asarray(result.images[0])


def test_colours_match_the_prompt(pipe: Pipeline) -> None:
    misses = []
    for seed, (prompt, colour, background) in enumerate(CASES):
        got = shapes.dominant_colours(_draw(pipe, prompt, seed))
        if got != (colour, background):
            misses.append(f"{prompt!r} (seed {seed}) drew a {got[0]} shape on {got[1]}")
    accuracy = 1 - len(misses) / len(CASES)
    assert accuracy >= MIN_ACCURACY, f"{accuracy:.0%} right on {pipe.backend.kind}; " + "; ".join(misses)


def test_the_prompt_changes_the_picture(pipe: Pipeline) -> None:
    first = _draw(pipe, CASES[0][0], seed=3).astype(np.int16)
    second = _draw(pipe, CASES[1][0], seed=3).astype(np.int16)
    again = _draw(pipe, CASES[0][0], seed=3).astype(np.int16)
    assert np.array_equal(first, again)  # the same prompt and seed draw the same picture
    assert np.abs(first - second).mean() > 30  # 0..255 levels: a different picture, not a few pixels


def test_demo_grid_reuses_a_current_export(trained_export: Path, tmp_path: Path) -> None:
    export = shutil.copytree(trained_export, tmp_path / "tiny-sd-onnx")  # the demo's own export, up to date
    exported_at = (export / "manifest.json").stat().st_mtime_ns
    assert main(["-q", "demo", "--grid", "--root", str(tmp_path), "--steps", "2"]) == 0
    assert (export / "manifest.json").stat().st_mtime_ns == exported_at  # not exported again
    rows = -(-len(DEMO_GRID_PROMPTS) // 4)
    assert Image.open(tmp_path / "demo-grid.png").size == (4 * 192, rows * (192 + 30))  # 4 columns of 3x 64 px


def test_the_classifier_reads_the_training_images() -> None:
    scenes, images = shapes.make_dataset(200, seed=1)
    for scene, image in zip(scenes, images, strict=True):
        assert shapes.dominant_colours(image) == (scene.colour, scene.background), scene


def test_the_shipped_model_is_small() -> None:
    files = [p for p in demo_model_dir().rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert sum(p.stat().st_size for p in files) <= MAX_SHIPPED_MB * 2**20
