"""The generation tasks from noise or from an image: txt2img, img2img (and its second-stage form),
the x4 upscale; and the checks every task makes against the model it runs on.

Each task is a function of one Generation (the checked request, its noise and timings) and of its
own inputs. Inpainting and outpainting live in runtime/inpainting.py.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Manifest, rebuild_command
from sdtrt.runtime import canvas
from sdtrt.runtime import image as imageio
from sdtrt.runtime.generation import Generation, GenerationResult
from sdtrt.runtime.request import Limits, is_integer, is_real
from sdtrt.runtime.schedulers import make_scheduler

DENOISING_FAMILIES = ("sd1", "sd2", "sdxl")


def txt2img(
    gen: Generation,
    latents: np.ndarray | None = None,
    denoising_end: float | None = None,
    decode: bool = True,
) -> GenerationResult:
    """Pipeline.txt2img."""
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
    if latents is not None:
        if not isinstance(latents, np.ndarray):
            raise InvalidInputError(f"latents must be a NumPy array of shape {shape}, not {type(latents).__name__}")
        if latents.shape != shape:
            raise InvalidInputError(f"latents have shape {latents.shape}, expected {shape}")
        check_finite("latents", latents)
    sched = gen.scheduler()
    stop = sched.end_index(denoising_end)
    feeds = gen.conditioning(height, width)

    if latents is None:
        latents = gen.normal(shape)
    latents = latents.astype(np.float32) * np.float32(sched.init_noise_sigma)  # (B, C, H/8, W/8) float32
    latents = gen.denoise(sched, 0, latents, feeds, stop=stop)
    return gen.finish(sched, latents, images=None if decode else [])


def img2img(
    gen: Generation,
    image: imageio.ImageInput,  # or, with denoising_start, a first stage's latents
    strength: float = 0.8,
    denoising_start: float | None = None,
) -> GenerationResult:
    """Pipeline.img2img."""
    if denoising_start is not None:
        require(gen, "img2img", unet_in_channels=4)
        check_strength(strength)
        return _continue(gen, image, denoising_start)
    require(gen, "img2img", unet_in_channels=4, needs=("vae_encoder",))
    strength = check_strength(strength)
    source = imageio.load_rgb(image)
    height, width = default_size(gen, source)
    check_size(gen, height, width)
    sched = gen.scheduler()
    start = sched.strength_start(gen.request.num_inference_steps, strength)
    feeds = gen.conditioning(height, width)

    image_latents = gen.encode_image(imageio.image_to_array(source, height, width))  # (1, C, h, w)
    image_latents = np.repeat(image_latents, gen.batch, axis=0)
    noise = gen.normal(image_latents.shape)
    if start < len(sched.timesteps):
        latents = sched.add_noise(image_latents, noise, start)
        latents = gen.denoise(sched, start, latents, feeds)
    else:
        latents = image_latents
    return gen.finish(sched, latents)


def _continue(gen: Generation, latents: np.ndarray, denoising_start: float) -> GenerationResult:
    """img2img's second-stage form: denoise the given latents from ``denoising_start`` of the schedule."""
    m = gen.manifest
    if not isinstance(latents, np.ndarray) or latents.ndim != 4 or latents.shape[1] != m.latent_channels:
        raise InvalidInputError(
            f"with denoising_start, image must be latents of shape (B, {m.latent_channels}, h, w) "
            "from a first stage (txt2img with denoising_end and decode=False)"
        )
    height, width = latents.shape[2] * m.vae_scale_factor, latents.shape[3] * m.vae_scale_factor
    check_size(gen, height, width)
    if latents.shape[0] != gen.batch:
        raise InvalidInputError(f"{latents.shape[0]} latents for a batch of {gen.batch} images")
    check_finite("latents", latents)
    sched = gen.scheduler()
    start = sched.continue_index(denoising_start)
    feeds = gen.conditioning(height, width)
    latents = gen.denoise(sched, start, latents.astype(np.float32), feeds)
    return gen.finish(sched, latents)


def upscale(
    gen: Generation,
    image: imageio.ImageInput,
    noise_level: int = 20,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    tiling: bool = True,
) -> GenerationResult:
    """Pipeline.upscale."""
    require(gen, "upscale", families=("upscaler",))
    m = gen.manifest
    step = m.size_multiple // m.vae_scale_factor  # the low-res image is the latent: it needs the UNet's step
    tile_size = m.default_height // m.vae_scale_factor if tile_size is None else tile_size
    tile_overlap = min(16, tile_size // 4) if tile_overlap is None else tile_overlap
    max_level = m.max_noise_level or 0
    if not is_integer(noise_level) or not 0 <= noise_level <= max_level:
        raise InvalidInputError(f"noise_level must be an integer from 0 to {max_level}, got {noise_level!r}")
    if not is_integer(tile_size) or tile_size < step or tile_size % step:
        raise InvalidInputError(f"tile_size must be a positive multiple of {step}, got {tile_size!r}")
    if not is_integer(tile_overlap) or not 0 <= tile_overlap < tile_size // 2:
        raise InvalidInputError(f"tile_overlap must be an integer from 0 to {tile_size // 2 - 1}, got {tile_overlap!r}")
    noise_level, tile_size, tile_overlap = int(noise_level), int(tile_size), int(tile_overlap)
    source = imageio.load_rgb(image)
    height, width = imageio.fit_size(source, None, None, step)
    for name, size in (("height", height), ("width", width)):
        gen.limits.check_side(f"upscale output {name}", size * m.vae_scale_factor)
    if not tiling and max(height, width) > tile_size:
        raise InvalidInputError(
            f"input {width}x{height} is larger than the tile budget {tile_size}x{tile_size}: "
            "allow tiling, or pass a larger tile_size if memory allows"
        )
    sched = gen.scheduler()
    feeds = gen.conditioning(height, width)

    low_res = imageio.image_to_array(source, height, width, resample="bicubic")  # (1, 3, h, w) in [-1, 1]
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
    return gen.finish(sched, final_latents, images=imageio.to_pil(out / weight))


# --------------------------------------------------------------------------------------------------
# Checks against the model


def require(
    gen: Generation,
    task: str,
    families: tuple[str, ...] = DENOISING_FAMILIES,
    unet_in_channels: int | None = None,
    needs: tuple[str, ...] = (),
) -> None:
    """One clear error when this export cannot serve ``task``."""
    m, folder = gen.manifest, gen.networks.artifact.folder
    if m.family not in families:
        use = "upscale" if m.family == "upscaler" else "txt2img, img2img, inpaint or outpaint"
        raise InvalidInputError(
            f"{task} works on {'/'.join(families)} models; {folder} holds a {m.family} model: use {use}"
        )
    if unet_in_channels is not None and m.unet_in_channels != unet_in_channels:
        raise InvalidInputError(
            f"{task} needs a {unet_in_channels}-channel UNet; {folder} holds an inpainting model "
            f"({m.unet_in_channels} channels): use inpaint or outpaint"
        )
    for network in needs:
        if network not in m.components:
            raise InvalidInputError(
                f"{task} needs the {network} network, which {folder} lacks: re-export with "
                f"`{rebuild_command(folder, m.source.get('path'))}` (all networks by default)"
            )


def model_limits(m: Manifest, max_side: int | None = None, max_images: int | None = None) -> Limits:
    """The ceiling of requests to this model (Limits.resolve); by default twice its native side, and for an
    x4 upscaler, whose limit is on its output, four times that: its tiles bound the networks' memory."""
    native = max(m.default_height, m.default_width)
    if m.family == "upscaler":
        side, origin = 2 * native * m.vae_scale_factor, f"the default: inputs up to twice its native {native} px"
    else:
        side, origin = 2 * native, f"the default: twice this model's native {native} px"
    return Limits.resolve(side, origin, max_side, max_images)


def default_size(gen: Generation, image: Image.Image) -> tuple[int, int]:
    """The (height, width) an input image is generated at: as asked; a side left out keeps the image's aspect
    ratio; with neither, the image's own size scaled down to the model's native area (and the ceiling)."""
    m, r = gen.manifest, gen.request
    area = m.default_height * m.default_width
    return imageio.fit_size(image, r.height, r.width, m.size_multiple, area, gen.limits.max_side)


def check_size(gen: Generation, height: int, width: int) -> None:
    m = gen.manifest
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidInputError(f"{name} must be a positive integer, got {size!r}")
        if size % m.vae_scale_factor:
            raise InvalidInputError(f"{name} {size} is not divisible by {m.vae_scale_factor}")
        if size % m.size_multiple:
            raise InvalidInputError(
                f"{name} {size} must be a multiple of {m.size_multiple} for this model "
                f"(its UNet down-samples the {m.vae_scale_factor}x latents further); "
                f"try {size // m.size_multiple * m.size_multiple or m.size_multiple}"
            )
        gen.limits.check_side(name, size)


def check_strength(strength: float) -> float:
    """``strength`` as a float from 0 to 1; one clear error otherwise."""
    if not is_real(strength) or not 0.0 <= strength <= 1.0:
        raise InvalidInputError(f"strength must be a number from 0 to 1, got {strength!r}")
    return float(strength)


def check_finite(what: str, array: np.ndarray) -> None:
    """One clear error for an array of inputs that is not numbers, or holds NaN or inf."""
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(f"{what} must hold numbers, not {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInputError(f"{what} hold NaN or inf: pass finite values")
