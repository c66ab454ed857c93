"""The CPU precisions' quality gate: the tiny parity model's final 8-bit image against diffusers fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdtrt.runtime.pipeline import Pipeline

PROMPT = "a red circle on a blue background, top left"
OPTIONS = {"negative_prompt": "blurry, low quality", "num_inference_steps": 12, "guidance_scale": 7.5}


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
    expected = np.asarray(reference(PROMPT, latents=torch.from_numpy(latents), **OPTIONS).images[0], np.float64)
    with Pipeline.load(export, backend=backend, precision=precision) as pipe:
        ours = np.asarray(pipe.txt2img(PROMPT, latents=latents, **OPTIONS).images[0], np.float64)
    psnr = 10 * np.log10(255**2 / ((ours - expected) ** 2).mean())
    return psnr, np.abs(ours - expected).max(), expected.std()
