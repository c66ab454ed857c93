"""txt2img: images from noise and a prompt (and, optionally, ControlNets)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdtrt.engine.errors import InvalidInputError
from sdtrt.runtime.generation import Generation, GenerationResult
from sdtrt.runtime.tasks.checks import check_finite, check_size, default_size, require
from sdtrt.runtime.tasks.record import Task, option


@dataclass(frozen=True)
class Txt2ImgOptions:
    latents: np.ndarray | None = option(
        None, "(B, C, H/8, W/8) initial noise replacing the seeded one", kind="array", python_only=True
    )
    denoising_end: float | None = option(
        None,
        "a fraction in (0, 1) of the schedule to stop at, leaving the rest to a second stage",
        kind="float",
        python_only=True,
    )
    decode: bool = option(True, "run the VAE (False: latents only)", python_only=True)


def txt2img(gen: Generation, options: Txt2ImgOptions) -> GenerationResult:
    require(gen, "txt2img", unet_in_channels=4)
    if gen.conditioner.refiner:
        raise InvalidInputError("the SDXL refiner is a second stage: use img2img (with denoising_start)")
    m = gen.manifest
    r = gen.request
    height = m.default_height if r.height is None else r.height
    width = m.default_width if r.width is None else r.width
    if gen.control is not None and r.height is None and r.width is None:  # diffusers: the control image's size
        height, width = default_size(gen, gen.control.first_image)
    check_size(gen, height, width)
    shape = gen.latent_shape(height, width)
    latents = options.latents
    if latents is not None:
        if not isinstance(latents, np.ndarray):
            raise InvalidInputError(f"latents must be a NumPy array of shape {shape}, not {type(latents).__name__}")
        if latents.shape != shape:
            raise InvalidInputError(f"latents have shape {latents.shape}, expected {shape}")
        check_finite("latents", latents)
    sched = gen.scheduler()
    stop = sched.end_index(options.denoising_end)
    feeds = gen.conditioning(height, width)

    if latents is None:
        latents = gen.normal(shape)
    latents = latents.astype(np.float32) * np.float32(sched.init_noise_sigma)  # (B, C, H/8, W/8) float32
    latents = gen.denoise(sched, 0, latents, feeds, stop=stop)
    return gen.finish(sched, latents, images=None if options.decode else [])


TASK = Task(
    name="txt2img",
    run=txt2img,
    options=Txt2ImgOptions,
    summary="draw a prompt: text to image",
    doc="""Generate ``num_images`` images per prompt from noise.

Own options: ``latents`` (B, C, H/8, W/8) replaces the seeded initial noise; ``denoising_end``
in (0, 1) stops early, leaving the rest of the schedule to a second stage (SDXL's refiner,
through img2img with ``denoising_start``); ``decode=False`` skips the VAE and returns only
latents. Timings in the result, in seconds: text_encoder, unet (all steps), scheduler (the
NumPy loop outside the UNet), vae_decode and total.

ControlNets (txt2img, img2img, inpaint), with diffusers' names: ``control_image`` (one per
ControlNet), ``controlnet`` (attached names; default all), ``controlnet_conditioning_scale``,
``control_guidance_start`` / ``control_guidance_end`` and ``guess_mode`` (runtime/control.py).
Without height and width, txt2img draws at the first control image's size fitted to the model.""",
    steps=30,
    size_help="the model's native size; with ControlNets, the first control image's, fitted",
    controlnets=True,
    batchable=True,
    command="generate",
)
