"""The checks every task makes against the model it runs on and the size it draws at."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Manifest, rebuild_command
from sdtrt.runtime import image as image_ops
from sdtrt.runtime.generation import Generation
from sdtrt.runtime.request import Limits

DENOISING_FAMILIES = ("sd1", "sd2", "sdxl")


def require(
    gen: Generation,
    task: str,
    families: tuple[str, ...] = DENOISING_FAMILIES,
    unet_in_channels: int | None = None,
    needs: tuple[str, ...] = (),
) -> None:
    """One clear error when this export cannot serve ``task``."""
    m, folder = gen.manifest, gen.sessions.artifact.folder
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
    return image_ops.fit_size(image, r.height, r.width, m.size_multiple, area, gen.limits.max_side)


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


def check_finite(what: str, array: np.ndarray) -> None:
    """One clear error for an array of inputs that is not numbers, or holds NaN or inf."""
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(f"{what} must hold numbers, not {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInputError(f"{what} hold NaN or inf: pass finite values")
