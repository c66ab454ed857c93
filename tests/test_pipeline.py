"""txt2img end to end: our runtime on ONNX Runtime CPU against diffusers' StableDiffusionPipeline."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdtrt.engine.artifact import open_artifact
from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import Request

PROMPT = "a red circle on a blue background, top left"
NEGATIVE = "blurry, low quality"
# diffusers class and from_config overrides behind each of our scheduler names
DIFFUSERS_SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
}
# Parity tolerances. The networks agree to ~1e-6 (test_export); over 12 steps with CFG 7.5 the
# latents drift by float32 rounding only (measured: 1.0e-6 to 1.4e-6 relative). Images are compared
# as the 8-bit pixels a user gets: rounding can flip a pixel by one level (measured: under 0.01 %
# of the values), nothing more.
LATENT_TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers|
PIXEL_TOLERANCE = 1  # max |ours - diffusers| in 0..255 levels
PIXELS_OFF_BY_ONE = 1e-3  # largest share of values that may differ at all


@pytest.fixture(scope="module")
def pipe(tiny_export: Path, cpu_backend: dict) -> Pipeline:
    with Pipeline.load(tiny_export, **cpu_backend) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_model_dir: Path):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    reference.model_scheduler_config = dict(reference.scheduler.config)  # each test starts from the model's
    return reference


def _diffusers_run(reference, scheduler: str, latents: np.ndarray, steps: int, output_type: str):
    import diffusers
    import torch

    class_name, overrides = DIFFUSERS_SCHEDULERS[scheduler]
    reference.scheduler = getattr(diffusers, class_name).from_config(reference.model_scheduler_config, **overrides)
    return reference(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=latents.shape[2] * 8,
        width=latents.shape[3] * 8,
        latents=torch.from_numpy(latents),
        output_type=output_type,
    ).images


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS_SCHEDULERS))
def test_txt2img_matches_diffusers(pipe: Pipeline, diffusers_pipe, scheduler: str) -> None:
    steps = 12
    latents = np.random.default_rng(7).standard_normal((1, 4, 32, 32), dtype=np.float32)
    ours = pipe.txt2img(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=7.5,
        latents=latents,
        scheduler=scheduler,
    )
    expected_latents = _diffusers_run(diffusers_pipe, scheduler, latents, steps, "latent").numpy()
    latent_error = np.abs(ours.latents - expected_latents).max() / np.abs(expected_latents).max()
    assert latent_error < LATENT_TOLERANCE, f"{scheduler}: latent relative error {latent_error:.2e}"

    expected_image = np.asarray(_diffusers_run(diffusers_pipe, scheduler, latents, steps, "pil")[0], dtype=np.int16)
    ours_image = np.asarray(ours.images[0], dtype=np.int16)
    assert ours_image.shape == expected_image.shape == (256, 256, 3)
    assert np.abs(ours_image - expected_image).max() <= PIXEL_TOLERANCE
    assert (ours_image != expected_image).mean() <= PIXELS_OFF_BY_ONE
    assert ours_image.std() > 10  # a real picture, not a saturated one that would hide differences
    assert ours.scheduler == scheduler
    assert set(ours.timings) == {"text_encoder", "unet", "scheduler", "vae_decode", "total"}


def test_seed_reproduces_the_image(pipe: Pipeline) -> None:
    first = pipe.txt2img(PROMPT, num_inference_steps=3, seed=1234, height=128, width=192)
    again = pipe.txt2img(PROMPT, num_inference_steps=3, seed=1234, height=128, width=192)
    other = pipe.txt2img(PROMPT, num_inference_steps=3, seed=1235, height=128, width=192)
    assert first.images[0].size == (192, 128)
    assert np.array_equal(first.latents, again.latents)
    assert not np.array_equal(first.latents, other.latents)
    # the seed names the initial noise: NumPy's PCG64 standard normal, scaled by the scheduler's sigma
    noise = np.random.default_rng(1234).standard_normal((1, 4, 16, 24), dtype=np.float32)
    again_from_noise = pipe.txt2img(PROMPT, num_inference_steps=3, latents=noise, height=128, width=192)
    assert np.array_equal(again_from_noise.latents, first.latents)


def test_batch_of_prompts_and_images(pipe: Pipeline) -> None:
    result = pipe.txt2img(["a cat", "a dog"], num_images=2, num_inference_steps=2, seed=3, scheduler="euler_a")
    assert len(result.images) == 4
    assert result.latents.shape == (4, 4, 32, 32)
    single = pipe.txt2img("a cat", num_inference_steps=2, seed=5, guidance_scale=1.0)  # no CFG: one UNet row
    assert single.latents.shape == (1, 4, 32, 32)


def test_truncated_prompt_warns(pipe: Pipeline, caplog: pytest.LogCaptureFixture) -> None:
    long_prompt = " ".join(["castle"] * 80) + " dragons"
    with caplog.at_level(logging.WARNING, logger="sdtrt"):
        pipe.txt2img(long_prompt, num_inference_steps=1, seed=0)
    assert any("dragons" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 250}, "height 250 is not divisible by 8"),
        ({"width": 200}, "width 200 must be a multiple of 16"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
        ({"num_inference_steps": -3}, "num_inference_steps must be an integer >= 1"),
        ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0"),
        ({"num_images": 0}, "num_images must be an integer >= 1"),
        ({"scheduler": "heun++"}, "heun\\+\\+"),
        ({"seed": -1}, "seed must be an integer"),
        ({"negative_prompt": ["a", "b"]}, "2 negative prompts for 1 prompts"),
        ({"latents": np.zeros((1, 4, 8, 8), np.float32)}, "latents have shape"),
        ({"latents": [[0.0]]}, "latents must be a NumPy array"),
        ({"negative_prompt": 3}, "negative_prompt must be a string or a list of strings"),
        ({"negative_prompt": [None]}, "negative_prompt must be a string or a list of strings"),
    ],
)
def test_bad_requests_are_one_clear_error(pipe: Pipeline, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        pipe.txt2img(PROMPT, **{"num_inference_steps": 2, **kwargs})


def test_one_request_object_serves_every_task(pipe: Pipeline) -> None:
    """The keyword API and run(task, Request) are one path: same request, same seed, same image."""
    options = {"num_inference_steps": 2, "seed": 7, "height": 128, "width": 128}
    by_keywords = pipe.txt2img(PROMPT, **options)
    by_request = pipe.run("txt2img", Request(PROMPT, **options))
    np.testing.assert_array_equal(by_request.latents, by_keywords.latents)
    assert Request(PROMPT).checked("upscale").num_inference_steps == 75  # each task's own defaults
    assert Request(PROMPT).checked("txt2img").guidance_scale == 7.5
    with pytest.raises(InvalidInputError, match=r"txt2img has no option 'strength' \(its own: latents"):
        pipe.txt2img(PROMPT, strength=0.5)
    with pytest.raises(InvalidInputError, match="unknown task 'paint'"):
        pipe.run("paint", Request(PROMPT))
    with pytest.raises(InvalidInputError, match="upscale takes no height or width"):
        Request(PROMPT, height=512).checked("upscale")


def test_weight_maps_are_read_once(tiny_export: Path) -> None:
    """The artifact reads each weight map once and hands the same object to its session and to LoRA."""
    artifact = open_artifact(tiny_export, "ort-cpu")
    maps = artifact.weight_maps()
    assert set(maps) == {"text_encoder", "unet"}
    assert artifact.weight_map("unet") is maps["unet"]
    assert artifact.session("unet")._weight_map is maps["unet"]
    assert artifact.weight_map("vae_decoder") is None
    artifact.close()


@pytest.mark.parametrize("prompt", [None, 42, [], ["a", None]])
def test_bad_prompts_are_one_clear_error(pipe: Pipeline, prompt) -> None:
    with pytest.raises(InvalidInputError, match="prompt must be a string or a non-empty list of strings"):
        pipe.txt2img(prompt, num_inference_steps=2)


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no artifact folder"):
        Pipeline.load(tmp_path / "missing")
    (tmp_path / "manifest.json").write_text("not json")
    with pytest.raises(ManifestError, match="corrupt manifest"):
        Pipeline.load(tmp_path)


def test_runtime_never_imports_torch(tiny_export: Path) -> None:
    """Generate in a fresh interpreter and check which heavy modules it loaded."""
    code = f"""
import sys
from sdtrt.runtime.pipeline import Pipeline
import sdtrt.runtime.schedulers, sdtrt.runtime.tokenizer, sdtrt.cli
Pipeline.load({str(tiny_export)!r}).txt2img("a cat", num_inference_steps=2, seed=0)
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "diffusers", "transformers", "tokenizers", "onnx"}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_top_of_the_step_range(tiny_export: Path) -> None:
    """num_train_timesteps steps run to a real picture with the schedulers that broke there (DDIM and PNDM
    indexed past their tables, DPM-Solver divided by zero); one more is one error (tests/test_schedulers.py
    sweeps every scheduler's edges)."""
    with Pipeline.load(tiny_export, backend="ort-cpu") as pipeline:
        options = {"num_inference_steps": 1000, "guidance_scale": 1.0, "height": 64, "width": 64, "seed": 0}
        for scheduler in ("ddim", "pndm", "dpmpp_2m"):
            result = pipeline.txt2img(PROMPT, scheduler=scheduler, **options)
            assert np.isfinite(result.latents).all() and np.asarray(result.images[0]).std() > 10, scheduler
        with pytest.raises(InvalidInputError, match="num_inference_steps must be an integer from 1 to 1000, got 1001"):
            pipeline.txt2img(PROMPT, **{**options, "num_inference_steps": 1001})
