"""img2img, inpainting (9-channel and latent blending), outpainting and x4 upscaling against diffusers.

Parity runs use the same weights, prompts, scheduler and noise: diffusers draws from a torch
Generator, and our pipelines take an ``rng`` that replays the same torch draws (TorchNoise), which
works because our pipelines draw in diffusers' order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch_noise import TorchNoise

from sdtrt.engine.errors import InvalidInputError
from sdtrt.runtime import canvas
from sdtrt.runtime.pipeline import Pipeline

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
# As the txt2img parity test (test_pipeline.py), with room for the VAE encoder the image enters
# through (ORT vs torch ~1e-6 per network; measured up to 1.6e-5 relative on the final latents).
LATENT_TOLERANCE = 5e-5  # max |ours - diffusers| / max |diffusers|
PIXEL_TOLERANCE = 1  # levels of 255
PIXELS_OFF_BY_ONE = 1e-3


def _test_image(height: int = 256, width: int = 256) -> Image.Image:
    """A smooth, deterministic picture: colour gradients and a disc."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08).astype(np.float64)
    rgb = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y, 0.8 - 0.6 * disc], axis=-1)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def _box_mask(height: int = 256, width: int = 256) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[64:176, 96:208] = 255
    return Image.fromarray(mask)


def _diffusers(pipeline_class: str, folder: Path, scheduler: str | None = None):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    classes = {
        "ddim": ("DDIMScheduler", {}),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
    }
    if scheduler is not None:
        name, overrides = classes[scheduler]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    return pipe


def _assert_parity(ours, reference_latents: np.ndarray, reference_image: Image.Image) -> None:
    error = np.abs(ours.latents - reference_latents).max() / np.abs(reference_latents).max()
    assert error < LATENT_TOLERANCE, f"latent relative error {error:.2e}"
    got, expected = np.asarray(ours.images[0], np.int16), np.asarray(reference_image, np.int16)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= PIXEL_TOLERANCE
    assert (got != expected).mean() <= PIXELS_OFF_BY_ONE


def _both_outputs(run):
    """diffusers' latents and its PIL image for one configuration (two calls with the same seed)."""
    latents = run("latent").images
    image = run("pil").images[0]
    return latents.numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents), image


@pytest.fixture(scope="module")
def pipe(tiny_export: Path, cpu_backend: dict) -> Pipeline:
    with Pipeline.load(tiny_export, **cpu_backend) as pipeline:
        yield pipeline


@pytest.mark.parametrize(("scheduler", "strength"), [("ddim", 0.6), ("euler_a", 0.75), ("dpmpp_2m", 1.0)])
def test_img2img_matches_diffusers(pipe: Pipeline, tiny_model_dir: Path, scheduler: str, strength: float) -> None:
    reference = _diffusers("StableDiffusionImg2ImgPipeline", tiny_model_dir, scheduler)
    image = _test_image()

    def run(output_type: str):
        return reference(
            PROMPT,
            image=image,
            strength=strength,
            negative_prompt=NEGATIVE,
            num_inference_steps=10,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(3),
            output_type=output_type,
        )

    ours = pipe.img2img(
        PROMPT,
        image,
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=10,
        guidance_scale=7.5,
        scheduler=scheduler,
        rng=TorchNoise(3),
    )
    _assert_parity(ours, *_both_outputs(run))
    assert set(ours.timings) >= {"text_encoder", "vae_encode", "unet", "vae_decode", "total"}


@pytest.mark.parametrize(("scheduler", "strength"), [("ddim", 1.0), ("euler_a", 0.7)])
def test_inpaint_by_latent_blending_matches_diffusers(
    pipe: Pipeline, tiny_model_dir: Path, scheduler: str, strength: float
) -> None:
    reference = _diffusers("StableDiffusionInpaintPipeline", tiny_model_dir, scheduler)
    image, mask = _test_image(), _box_mask()

    def run(output_type: str):
        return reference(
            PROMPT,
            image=image,
            mask_image=mask,
            strength=strength,
            negative_prompt=NEGATIVE,
            num_inference_steps=8,
            guidance_scale=7.5,
            height=256,
            width=256,
            generator=torch.Generator().manual_seed(4),
            output_type=output_type,
        )

    ours = pipe.inpaint(
        PROMPT,
        image,
        mask,
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=8,
        scheduler=scheduler,
        rng=TorchNoise(4),
    )
    _assert_parity(ours, *_both_outputs(run))


@pytest.mark.parametrize(("scheduler", "strength"), [("pndm", 1.0), ("euler", 0.8)])
def test_inpainting_model_matches_diffusers(
    tiny_inpaint_model_dir: Path, tiny_inpaint_export: Path, scheduler: str, strength: float
) -> None:
    reference = _diffusers(
        "StableDiffusionInpaintPipeline", tiny_inpaint_model_dir, None if scheduler == "pndm" else scheduler
    )
    image, mask = _test_image(), _box_mask()

    def run(output_type: str):
        return reference(
            PROMPT,
            image=image,
            mask_image=mask,
            strength=strength,
            negative_prompt=NEGATIVE,
            num_inference_steps=8,
            guidance_scale=7.5,
            height=256,
            width=256,
            generator=torch.Generator().manual_seed(5),
            output_type=output_type,
        )

    with Pipeline.load(tiny_inpaint_export, backend="ort-cpu") as ours_pipe:
        ours = ours_pipe.inpaint(
            PROMPT,
            image,
            mask,
            strength=strength,
            negative_prompt=NEGATIVE,
            num_inference_steps=8,
            scheduler=scheduler,
            rng=TorchNoise(5),
        )
        with pytest.raises(InvalidInputError, match=r"inpainting model.*use inpaint or outpaint"):
            ours_pipe.txt2img(PROMPT, num_inference_steps=1)
    _assert_parity(ours, *_both_outputs(run))


def test_upscale_matches_diffusers(tiny_upscaler_dir: Path, tiny_upscaler_export: Path) -> None:
    reference = _diffusers("StableDiffusionUpscalePipeline", tiny_upscaler_dir)
    low_res = _test_image(32, 32)

    def run(output_type: str):
        return reference(
            PROMPT,
            image=low_res,
            noise_level=20,
            negative_prompt=NEGATIVE,
            num_inference_steps=8,
            guidance_scale=9.0,
            generator=torch.Generator().manual_seed(6),
            output_type=output_type,
        )

    with Pipeline.load(tiny_upscaler_export, backend="ort-cpu") as upscaler:
        ours = upscaler.upscale(
            PROMPT, low_res, noise_level=20, negative_prompt=NEGATIVE, num_inference_steps=8, rng=TorchNoise(6)
        )
    assert ours.images[0].size == (128, 128)
    _assert_parity(ours, *_both_outputs(run))


def test_upscale_tiles_large_inputs(tiny_upscaler_export: Path) -> None:
    low_res = _test_image(40, 56)
    with Pipeline.load(tiny_upscaler_export, backend="ort-cpu") as upscaler:
        whole = upscaler.upscale(PROMPT, low_res, num_inference_steps=3, seed=1, tile_size=64)
        one_tile = upscaler.upscale(PROMPT, low_res, num_inference_steps=3, seed=1, tile_size=64, tiling=False)
        tiled = upscaler.upscale(PROMPT, low_res, num_inference_steps=3, seed=1, tile_size=32, tile_overlap=8)
        with pytest.raises(InvalidInputError, match="larger than the tile budget 32x32"):
            upscaler.upscale(PROMPT, low_res, num_inference_steps=3, seed=1, tile_size=32, tiling=False)
        with pytest.raises(InvalidInputError, match="noise_level must be an integer from 0 to 350"):
            upscaler.upscale(PROMPT, low_res, noise_level=351)
        with pytest.raises(InvalidInputError, match=r"txt2img works on sd1/sd2/sdxl models.*use upscale"):
            upscaler.txt2img(PROMPT)
    assert whole.images[0].size == tiled.images[0].size == (224, 160)
    assert np.array_equal(np.asarray(whole.images[0]), np.asarray(one_tile.images[0]))
    # tiles see the same noise; they differ from one big tile only through their receptive fields
    difference = np.abs(np.asarray(whole.images[0], np.int16) - np.asarray(tiled.images[0], np.int16))
    assert difference.mean() < 64


def test_outpaint_extends_and_keeps_the_original(pipe: Pipeline) -> None:
    image = _test_image(128, 96)
    result = pipe.outpaint(PROMPT, image, left=32, right=20, top=16, num_inference_steps=4, seed=2, overlap=8)
    out = np.asarray(result.images[0])
    # width 96 + 32 + 20 = 148 grows to 160 (the model's multiple of 16); height 128 + 16 = 144
    assert out.shape == (144, 160, 3)
    # far from the seams (overlap 8 + blur 8 * 3) the original pixels come back untouched
    inner = out[16 + 40 : 16 + 128, 32 + 40 : 32 + 96 - 40]
    assert np.array_equal(inner, np.asarray(image)[40:, 40:56])


def test_outpaint_canvas_geometry() -> None:
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    painted, mask = canvas.outpaint_canvas(image, left=2, right=0, top=0, bottom=1, overlap=1, multiple=4)
    assert painted.shape == (8, 8, 3)  # height 4 + 1 -> 8, width 6 + 2 -> 8 (grown on bottom and right)
    assert np.array_equal(painted[:4, 2:8], image)
    assert np.array_equal(painted[:4, 0], image[:, 0])  # border pixels stretched outwards
    expected = np.zeros((8, 8), np.uint8)
    expected[:, :3] = 255  # left extension + 1 px overlap
    expected[3:, :] = 255  # bottom extension (1 + 3 to reach the multiple) + 1 px overlap
    assert np.array_equal(mask, expected)


def test_tiles_cover_with_overlap() -> None:
    tiles = canvas.tile_grid(100, 40, tile=48, overlap=8)
    assert [(y, x) for y, x, *_ in tiles] == [(0, 0), (40, 0), (52, 0)]
    coverage = np.zeros((100, 40))
    for y, x, h, w in tiles:
        coverage[y : y + h, x : x + w] += canvas.feather(h, w, 8, y > 0, x > 0, y + h < 100, x + w < 40)[0, 0]
    assert coverage.min() > 0.5 and coverage.max() <= 2.0


@pytest.fixture
def no_encoder_export(tiny_export: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "no-encoder"
    shutil.copytree(tiny_export, folder, copy_function=lambda src, dst: Path(dst).symlink_to(src))
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_missing_vae_encoder_names_the_export_command(no_encoder_export: Path) -> None:
    with Pipeline.load(no_encoder_export, backend="ort-cpu") as pipe:
        with pytest.raises(
            InvalidInputError, match=r"img2img needs the vae_encoder network.*sdtrt export .* --overwrite"
        ):
            pipe.img2img(PROMPT, _test_image())
        with pytest.raises(InvalidInputError, match="inpaint needs the vae_encoder"):
            pipe.inpaint(PROMPT, _test_image(), _box_mask())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.img2img(PROMPT, _test_image(), strength=1.5), "strength must be a number from 0 to 1"),
        (lambda p: p.img2img(PROMPT, _test_image(), strength=-0.1), "strength must be a number from 0 to 1"),
        # (RGBA, L, P and 16-bit images are converted now: tests/test_bad_inputs_runtime.py)
        (lambda p: p.img2img(PROMPT, np.zeros((64, 64, 4), np.uint8)), r"must be \(H, W\) or \(H, W, 3\)"),
        (lambda p: p.img2img(PROMPT, _test_image(), width=4096), "width 4096 is above the ceiling of 512"),
        (lambda p: p.img2img(PROMPT, np.zeros((0, 0, 3), np.uint8)), "empty"),
        (lambda p: p.img2img(PROMPT, "/no/such/image.png"), "cannot read image"),
        (lambda p: p.img2img(PROMPT, _test_image(8, 8)), "smaller than this model's size step of 16"),
        (lambda p: p.inpaint(PROMPT, _test_image(), _box_mask(128, 256)), "mask is 256x128 but the image is 256x256"),
        (lambda p: p.inpaint(PROMPT, _test_image(), _box_mask(), mask_blur=-1), "mask_blur must be a number >= 0"),
        (lambda p: p.inpaint(PROMPT, _test_image(), _box_mask(), mask_blur="2"), "mask_blur must be a number >= 0"),
        (lambda p: p.inpaint(PROMPT, _test_image(), _box_mask(), mask_blur=None), "mask_blur must be a number >= 0"),
        (
            lambda p: p.inpaint(PROMPT, _test_image(), _box_mask(), strength=0.05, num_inference_steps=10),
            r"strength 0.05 is too small: no denoising step would run with 10 steps",
        ),
        (lambda p: p.inpaint(None, _test_image(), _box_mask()), "prompt must be a string"),
        (lambda p: p.outpaint(PROMPT, _test_image(64, 64), left=32, overlap=65), r"overlap=65 is larger .* width \(64"),
        # 40 rows grow to 48 (the size multiple), so the bottom edge takes the overlap too
        (
            lambda p: p.outpaint(PROMPT, _test_image(40, 64), left=16, overlap=48),
            r"overlap=48 is larger than the image height \(40",
        ),
        (lambda p: p.outpaint(PROMPT, _test_image()), "needs an extension > 0"),
        (lambda p: p.outpaint(PROMPT, _test_image(), left=-8), "left must be an integer >= 0"),
        (lambda p: p.outpaint(PROMPT, _test_image(), top=200), "at most 128 pixels"),
        (lambda p: p.upscale(PROMPT, _test_image()), "upscale works on upscaler models"),
    ],
)
def test_bad_image_requests_are_one_clear_error(pipe: Pipeline, call, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        call(pipe)


def test_strength_zero_returns_the_vae_round_trip(pipe: Pipeline) -> None:
    result = pipe.img2img(PROMPT, _test_image(), strength=0.0, num_inference_steps=10, seed=1)
    again = pipe.img2img(PROMPT, _test_image(), strength=0.05, num_inference_steps=10, seed=1)  # int(0.5) = 0 steps
    assert np.array_equal(result.latents, again.latents)
    assert "unet" not in result.timings  # no denoising step ran
