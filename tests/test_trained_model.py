"""The shipped demo model draws what it is asked, through export, engine and runtime, on every backend present.

The model (export/assets/tiny-sd, trained by train/tiny.py) knows one coloured shape on a coloured
background. Its pictures are judged by pixel statistics (train.shapes): the background is the
commonest palette colour on the border, the shape the commonest other colour around the centre of
mass of the rest (dominant_colours); the shape's kind is read from the share of its bounding box it
fills (shape_kind), its place from its centroid (shape_position). The shipped tiny ControlNet
(export/assets/tiny-controlnet, train/controlnet.py) is judged by train.evaluate.map_accuracy, the shipped tiny VAE
(export/assets/tiny-vae, train/tiny_vae.py) by the same readings of its pictures beside the full VAE's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtrt.cli import main
from sdtrt.demo import DEMO_GRID_PROMPTS, DEMO_GUIDANCE, demo_model_dir, demo_tiny_vae_dir
from sdtrt.engine.backends import BACKENDS
from sdtrt.engine.errors import BackendUnavailableError
from sdtrt.runtime.pipeline import Pipeline
from train import evaluate, shapes

# (prompt, shape colour, background colour, kind, place or None): every colour as a shape and as a
# background, every kind four times, every place, in every caption form
CASES = [
    ("a red circle on a blue background", "red", "blue", "circle", None),
    ("a yellow square on a black background, top left", "yellow", "black", "square", "top left"),
    ("a small green triangle on a white background, bottom right", "green", "white", "triangle", "bottom right"),
    ("a large blue circle on a yellow background, top right", "blue", "yellow", "circle", "top right"),
    ("a white square on a red background, center", "white", "red", "square", "center"),
    ("a black triangle on a green background", "black", "green", "triangle", None),
    ("a large red square on a white background", "red", "white", "square", None),
    ("a small yellow circle on a blue background, bottom left", "yellow", "blue", "circle", "bottom left"),
    ("a green circle on a black background, center", "green", "black", "circle", "center"),
    ("a blue triangle on a white background, top left", "blue", "white", "triangle", "top left"),
    ("a white triangle on a green background, bottom right", "white", "green", "triangle", "bottom right"),
    ("a black square on a yellow background, top right", "black", "yellow", "square", "top right"),
]
STEPS = 20
GUIDANCE = DEMO_GUIDANCE
MIN_COLOUR_ACCURACY = 0.9
MIN_KIND_ACCURACY = 0.8  # python -m train.evaluate's bars for kind and place, on a dozen captions
MIN_POSITION_ACCURACY = 0.8
MIN_MAP_ACCURACY = 0.9  # the ControlNet: centroid, coverage and colours all right
MAP_CASES = 10
MAX_SHIPPED_MB = 20
MAX_CONTROLNET_MB = 5
MAX_TINY_VAE_MB = 1
# The tiny VAE's pictures of the same latents: their colours and place read as the full VAE's in all but one of
# CASES, within this many levels of 255 of them on average; the prompt's colours and place at the bars above, its
# kind at a lower one (it rounds corners: 66 % against the full VAE's 86.5 % of 200 captions, docs/per-image.md)
MIN_TINY_VAE_AGREEMENT = 11 / 12
MAX_TINY_VAE_LEVELS = 8
MIN_TINY_VAE_KIND_ACCURACY = 0.6


@pytest.fixture(scope="module", params=list(BACKENDS))
def pipe(request: pytest.FixtureRequest, demo_export: Path) -> Pipeline:
    try:
        pipeline = Pipeline.load(demo_export, backend=request.param)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    with pipeline:
        yield pipeline


def _draw(pipe: Pipeline, prompt: str, seed: int, vae: str = "full") -> np.ndarray:
    """(64, 64, 3) uint8."""
    result = pipe.txt2img(prompt, num_inference_steps=STEPS, guidance_scale=GUIDANCE, seed=seed, vae=vae)
    return np.asarray(result.images[0])


@pytest.fixture(scope="module")
def drawn(pipe: Pipeline) -> list[np.ndarray]:
    """The pictures of CASES on ``pipe``'s backend, one seed each."""
    return [_draw(pipe, case[0], seed) for seed, case in enumerate(CASES)]


def _assert_share(pipe: Pipeline, misses: list[str], total: int, bar: float, what: str) -> None:
    accuracy = 1 - len(misses) / total
    assert accuracy >= bar, f"{what} {accuracy:.0%} right on {pipe.backend.kind}; " + "; ".join(misses)


def test_colours_match_the_prompt(pipe: Pipeline, drawn: list[np.ndarray]) -> None:
    misses = []
    for seed, ((prompt, colour, background, _, _), image) in enumerate(zip(CASES, drawn, strict=True)):
        got = shapes.dominant_colours(image)
        if got != (colour, background):
            misses.append(f"{prompt!r} (seed {seed}) drew a {got[0]} shape on {got[1]}")
    _assert_share(pipe, misses, len(CASES), MIN_COLOUR_ACCURACY, "colours")


def test_kind_matches_the_prompt(pipe: Pipeline, drawn: list[np.ndarray]) -> None:
    misses = []
    for seed, ((prompt, _, _, kind, _), image) in enumerate(zip(CASES, drawn, strict=True)):
        if (got := shapes.shape_kind(image)) != kind:
            misses.append(f"{prompt!r} (seed {seed}) drew a {got}")
    _assert_share(pipe, misses, len(CASES), MIN_KIND_ACCURACY, "kind")


def test_place_matches_the_prompt(pipe: Pipeline, drawn: list[np.ndarray]) -> None:
    placed = [(seed, case, image) for seed, (case, image) in enumerate(zip(CASES, drawn, strict=True)) if case[4]]
    misses = []
    for seed, (prompt, _, _, _, position), image in placed:
        if (got := shapes.shape_position(image)) != position:
            misses.append(f"{prompt!r} (seed {seed}) drew it at {got}")
    _assert_share(pipe, misses, len(placed), MIN_POSITION_ACCURACY, "place")


def test_the_prompt_changes_the_picture(pipe: Pipeline) -> None:
    first = _draw(pipe, CASES[0][0], seed=3).astype(np.int16)
    second = _draw(pipe, CASES[1][0], seed=3).astype(np.int16)
    again = _draw(pipe, CASES[0][0], seed=3).astype(np.int16)
    assert np.array_equal(first, again)  # the same prompt and seed draw the same picture
    assert np.abs(first - second).mean() > 30  # 0..255 levels: a different picture, not a few pixels


def test_the_tiny_vae_draws_the_same_shapes(demo_export: Path, tmp_path: Path) -> None:
    """The shipped tiny VAE decodes the demo UNet's latents into pictures of the full VAE's colours and place, and
    of the prompt's colours, place and (at a lower bar) kind."""
    from sdtrt.export.tiny_vae import attach_tiny_vae

    export = shutil.copytree(demo_export, tmp_path / "tiny-sd-onnx")
    attach_tiny_vae(export, demo_tiny_vae_dir())
    disagree, levels, misses = [], [], {"colours": 0, "kind": 0, "place": 0}
    with Pipeline.load(export, backend="ort-cpu") as pipe:
        for seed, (prompt, colour, background, kind, place) in enumerate(CASES):
            full, tiny = _draw(pipe, prompt, seed), _draw(pipe, prompt, seed, vae="tiny")
            levels.append(np.abs(full.astype(np.int16) - tiny).mean())
            read = shapes.dominant_colours(tiny), shapes.shape_position(tiny)
            if read != (shapes.dominant_colours(full), shapes.shape_position(full)):
                disagree.append(f"{prompt!r} (seed {seed}): {read}")
            misses["colours"] += read[0] != (colour, background)
            misses["kind"] += shapes.shape_kind(tiny) != kind
            misses["place"] += place is not None and read[1] != place
    assert 1 - len(disagree) / len(CASES) >= MIN_TINY_VAE_AGREEMENT, "; ".join(disagree)
    assert np.mean(levels) <= MAX_TINY_VAE_LEVELS, levels
    placed = sum(case[4] is not None for case in CASES)
    assert 1 - misses["colours"] / len(CASES) >= MIN_COLOUR_ACCURACY, misses
    assert 1 - misses["kind"] / len(CASES) >= MIN_TINY_VAE_KIND_ACCURACY, misses
    assert 1 - misses["place"] / placed >= MIN_POSITION_ACCURACY, misses


def test_demo_grid_reuses_a_current_export(demo_export: Path, tmp_path: Path) -> None:
    export = shutil.copytree(demo_export, tmp_path / "tiny-sd-onnx")  # the demo's own export, up to date
    exported_at = (export / "manifest.json").stat().st_mtime_ns
    assert main(["-q", "demo", "--grid", "--root", str(tmp_path), "--steps", "2"]) == 0
    assert (export / "manifest.json").stat().st_mtime_ns == exported_at  # not exported again
    rows = -(-len(DEMO_GRID_PROMPTS) // 4)
    assert Image.open(tmp_path / "demo-grid.png").size == (4 * 192, rows * (192 + 30))  # 4 columns of 3x 64 px


def test_the_classifiers_read_the_training_images() -> None:
    scenes, images = shapes.make_dataset(200, seed=1)
    for scene, image in zip(scenes, images, strict=True):
        assert shapes.dominant_colours(image) == (scene.colour, scene.background), scene
        assert shapes.shape_kind(image) == scene.shape, scene
        assert shapes.shape_position(image) == scene.position, scene
    assert shapes.shape_kind(np.full((64, 64, 3), 40, np.uint8)) is None  # no shape: nothing to classify
    assert shapes.shape_position(np.full((64, 64, 3), 40, np.uint8)) is None


def test_the_map_score_passes_the_map_and_fails_the_mirror() -> None:
    cases = evaluate.map_cases(20)
    scenes = {case.seed: case.scene for case in cases}

    def faithful(control: np.ndarray, prompt: str, seed: int) -> np.ndarray:
        return shapes.render(scenes[seed])

    def mirrored(control: np.ndarray, prompt: str, seed: int) -> np.ndarray:
        return shapes.render(scenes[seed])[::-1, ::-1]

    assert evaluate.map_accuracy(faithful, cases) == {"centroid": 1.0, "iou": 1.0, "colours": 1.0, "all": 1.0}
    assert evaluate.map_accuracy(mirrored, cases)["all"] < 0.5
    kind, region = shapes.read_map(cases[0].map)
    assert kind == cases[0].scene.shape and region.any()


def test_the_controlnet_draws_where_the_map_says() -> None:
    pytest.importorskip("torch")
    from train.controlnet import diffusers_drawer

    draw = diffusers_drawer(demo_model_dir(), controlnet_dir(), steps=STEPS, guidance=GUIDANCE)
    shares = evaluate.map_accuracy(draw, evaluate.map_cases(MAP_CASES))
    assert shares["all"] >= MIN_MAP_ACCURACY, shares


def test_the_controlnet_draws_where_the_map_says_on_the_runtime(demo_export: Path, tmp_path: Path) -> None:
    from sdtrt.export.controlnet import attach_controlnet

    export = shutil.copytree(demo_export, tmp_path / "tiny-sd-onnx")
    attach_controlnet(export, controlnet_dir(), name="map")
    shares = evaluate.map_accuracy_on_runtime(export, "map", MAP_CASES, steps=STEPS, guidance=GUIDANCE)
    assert shares["all"] >= MIN_MAP_ACCURACY, shares


def test_the_controlnet_fits_the_shipped_demo_model() -> None:
    report = json.loads((controlnet_dir() / "training.json").read_text())
    unet = demo_model_dir() / "unet" / "diffusion_pytorch_model.safetensors"
    assert report["base_unet_sha256"] == hashlib.sha256(unet.read_bytes()).hexdigest()
    maps = sorted((controlnet_dir().parent / "maps").glob("*.png"))
    assert len(maps) >= 2
    for path in maps:
        kind, region = shapes.read_map(np.asarray(Image.open(path).convert("RGB")))
        assert kind in shapes.SHAPES and region.any(), path


def test_the_shipped_models_are_small() -> None:
    budgets = ((demo_model_dir(), MAX_SHIPPED_MB), (controlnet_dir(), MAX_CONTROLNET_MB))
    for folder, budget_mb in (*budgets, (demo_tiny_vae_dir(), MAX_TINY_VAE_MB)):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files), folder
        assert sum(p.stat().st_size for p in files) <= budget_mb * 2**20, folder


def controlnet_dir() -> Path:
    """The shipped tiny ControlNet (a diffusers ControlNetModel folder) beside the demo model."""
    return demo_model_dir().parent / "tiny-controlnet"
