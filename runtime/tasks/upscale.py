"""upscale: 4x super-resolution with an x4-upscaler export, tiled so memory stays bounded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdtrt.engine.errors import InvalidInputError
from sdtrt.runtime import canvas
from sdtrt.runtime import image as image_ops
from sdtrt.runtime.generation import Generation, GenerationResult
from sdtrt.runtime.request import is_integer
from sdtrt.runtime.schedulers import make_scheduler
from sdtrt.runtime.tasks.checks import require
from sdtrt.runtime.tasks.record import Task, image_input, option

TILE_OVERLAP = 16  # low-res pixels tiles overlap by default (at most a quarter tile)


@dataclass(frozen=True)
class UpscaleOptions:
    image: image_ops.ImageInput = image_input("the low-resolution RGB image")
    noise_level: int = option(20, "noise added to the input, from 0 to the model's maximum", task_checks=True)
    tile_size: int | None = option(
        None, "input pixels per tile", kind="int", low=1, default_help="the model's native input size"
    )
    tile_overlap: int | None = option(
        None, "input pixels tiles overlap", kind="int", low=0, default_help=f"{TILE_OVERLAP}, at most a quarter tile"
    )
    tiling: bool = option(True, "cut inputs larger than one tile into tiles (False: refuse them)")


def upscale(gen: Generation, options: UpscaleOptions) -> GenerationResult:
    require(gen, "upscale", families=("upscaler",))
    m = gen.manifest
    step = m.size_multiple // m.vae_scale_factor  # the low-res image is the latent: it needs the UNet's step
    tile_size = m.default_height // m.vae_scale_factor if options.tile_size is None else options.tile_size
    tile_overlap = min(TILE_OVERLAP, tile_size // 4) if options.tile_overlap is None else options.tile_overlap
    noise_level, max_level = options.noise_level, m.max_noise_level or 0
    if not is_integer(noise_level) or not 0 <= noise_level <= max_level:
        raise InvalidInputError(f"noise_level must be an integer from 0 to {max_level}, got {noise_level!r}")
    if not is_integer(tile_size) or tile_size < step or tile_size % step:
        raise InvalidInputError(f"tile_size must be a positive multiple of {step}, got {tile_size!r}")
    if not 0 <= tile_overlap < tile_size // 2:  # an integer >= 0 already (check_arguments)
        raise InvalidInputError(f"tile_overlap must be an integer from 0 to {tile_size // 2 - 1}, got {tile_overlap!r}")
    noise_level = int(noise_level)
    source = image_ops.load_rgb(options.image)
    height, width = image_ops.fit_size(source, None, None, step)
    for name, size in (("height", height), ("width", width)):
        gen.limits.check_side(f"upscale output {name}", size * m.vae_scale_factor)
    if not options.tiling and max(height, width) > tile_size:
        raise InvalidInputError(
            f"input {width}x{height} is larger than the tile budget {tile_size}x{tile_size}: "
            "allow tiling, or pass a larger tile_size if memory allows"
        )
    sched = gen.scheduler()
    feeds = gen.conditioning(height, width)

    low_res = image_ops.image_to_array(source, height, width, resample="bicubic")  # (1, 3, h, w) in [-1, 1]
    alpha_cumprod = float(make_scheduler("ddim", m.low_res_scheduler or {}).alphas_cumprod[noise_level])
    noise = gen.normal(low_res.shape)
    noisy = np.float32(alpha_cumprod**0.5) * low_res + np.float32((1 - alpha_cumprod) ** 0.5) * noise
    latents = gen.normal((gen.batch, m.latent_channels, height, width)) * np.float32(sched.init_noise_sigma)
    condition = np.repeat(noisy, gen.batch, axis=0)  # (B, 3, h, w)
    feeds["noise_level"] = np.full(gen.batch * (2 if gen.cfg else 1), noise_level, dtype=np.int32)

    scale = m.vae_scale_factor
    out = np.zeros((gen.batch, 3, height * scale, width * scale), dtype=np.float32)  # weighted sum of tiles
    weight = np.zeros((1, 1, height * scale, width * scale), dtype=np.float32)
    final_latents = np.zeros_like(latents)
    for index, (y, x, h, w) in enumerate(canvas.tile_grid(height, width, tile_size, tile_overlap)):
        if index:
            sched.set_timesteps(gen.request.num_inference_steps)  # each tile runs the whole schedule afresh
        low = np.s_[:, :, y : y + h, x : x + w]
        high = np.s_[:, :, y * scale : (y + h) * scale, x * scale : (x + w) * scale]
        final_latents[low] = gen.denoise(sched, 0, latents[low], feeds, condition=condition[low])
        edges = (y > 0, x > 0, y + h < height, x + w < width)  # sides that another tile overlaps
        ramp = canvas.feather(h * scale, w * scale, tile_overlap * scale, *edges)
        out[high] += gen.decode(final_latents[low]) * ramp
        weight[high] += ramp
    return gen.finish(sched, final_latents, images=image_ops.to_pil(out / weight))


TASK = Task(
    name="upscale",
    run=upscale,
    options=UpscaleOptions,
    summary="4x super-resolution with an x4-upscaler export",
    doc="""Upscale ``image`` 4x with an x4-upscaler export, guided by ``prompt``.

The low-resolution image is rounded down to the UNet's size step, noised to ``noise_level``
and fed to the UNet beside the latents. Inputs larger than ``tile_size`` (default: the model's
native input size) are cut into tiles overlapping by ``tile_overlap`` low-res pixels, each
denoised on its own and feathered together, so memory stays bounded; ``tiling=False`` refuses
such inputs instead.""",
    steps=75,
    guidance=9.0,
    sized=False,
)
