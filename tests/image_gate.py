"""The CPU precisions' quality gate: the tiny parity model's final 8-bit image against diffusers fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sdtrt.runtime.pipeline import Pipeline

PROMPT = "a red circle on a blue background, top left"
OPTIONS = {"negative_prompt": "blurry, low quality", "num_inference_steps": 12, "guidance_scale": 7.5}
# bf16's gate, the final 8-bit image against fp32's (diffusers' on the tiny parity model, 12 steps, CFG 7.5; measured
# on an AMX-BF16 Xeon: 49-51 dB, at most 5 levels apart)
BF16_MIN_PSNR = 40.0  # dB
BF16_MAX_LEVELS = 12


def image_error(ours: Image.Image, expected: Image.Image) -> tuple[float, float]:
    """(PSNR in dB, largest difference in levels) of one 8-bit image against another."""
    a, b = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    return 10 * np.log10(255**2 / ((a - b) ** 2).mean()), np.abs(a - b).max()


def final_image_error(
    export: Path, model_dir: Path, precision: str, backend: str = "openvino"
) -> tuple[float, float, float]:
    """(PSNR in dB, largest difference in levels, the reference's standard deviation) of ``backend``'s final
    image at ``precision`` against diffusers fp32's, 12 steps, CFG 7.5, the same initial noise."""
    import torch
    from diffusers import StableDiffusionPipeline

    latents = np.random.default_rng(7).standard_normal((1, 4, 32, 32), dtype=np.float32)
    reference = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPT, latents=torch.from_numpy(latents), **OPTIONS).images[0]
    with Pipeline.load(export, backend=backend, precision=precision) as pipe:
        ours = pipe.txt2img(PROMPT, latents=latents, **OPTIONS).images[0]
    return *image_error(ours, expected), np.asarray(expected, np.float64).std()
