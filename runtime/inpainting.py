"""Inpainting (repaint the white part of a mask) and outpainting (extend an image past its borders).

Inpainting models (a 9-channel UNet) see the mask and the masked image at every step; any ordinary
model inpaints by latent blending: after each step the known region is replaced by the original
latents re-noised to the next timestep, as diffusers does.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from sdtrt.engine.errors import InvalidInputError
from sdtrt.runtime import canvas
from sdtrt.runtime import image as imageio
from sdtrt.runtime.generation import Generation, GenerationResult
from sdtrt.runtime.request import is_integer, is_real
from sdtrt.runtime.schedulers import Scheduler
from sdtrt.runtime.tasks import check_size, check_strength, default_size, require


def inpaint(
    gen: Generation,
    image: imageio.ImageInput,
    mask: imageio.ImageInput,
    strength: float = 1.0,
    mask_blur: float = 0.0,
) -> GenerationResult:
    """Pipeline.inpaint."""
    source, mask_image = imageio.load_rgb(image), imageio.load_mask(mask)
    return _inpaint(gen, source, mask_image, strength, mask_blur, default_size(gen, source))


def _inpaint(
    gen: Generation,
    source: Image.Image,
    mask_image: Image.Image,
    strength: float,
    mask_blur: float,
    size: tuple[int, int],
) -> GenerationResult:
    """Repaint ``mask_image``'s white part of ``source`` at ``size`` (height, width)."""
    require(gen, "inpaint", needs=("vae_encoder",))
    strength, mask_blur = check_strength(strength), _checked_mask_blur(mask_blur)
    if mask_image.size != source.size:
        raise InvalidInputError(
            f"mask is {mask_image.width}x{mask_image.height} but the image is {source.width}x{source.height}: "
            "they must be the same size"
        )
    m = gen.manifest
    height, width = size
    check_size(gen, height, width)
    sched = gen.scheduler()
    steps = gen.request.num_inference_steps
    start = sched.strength_start(steps, strength)
    _require_a_step(sched, start, steps, strength)
    feeds = gen.conditioning(height, width)

    pixels = imageio.image_to_array(source, height, width)  # (1, 3, H, W) in [-1, 1]
    mask_pixels = imageio.mask_to_array(mask_image, height, width)  # (1, 1, H, W): 1 = repaint
    blending = m.unet_in_channels == 4
    shape = gen.latent_shape(height, width)
    image_latents = None
    if blending or strength < 1.0:
        image_latents = np.repeat(gen.encode_image(pixels), gen.batch, axis=0)
    noise = gen.normal(shape)
    if strength == 1.0:
        latents = noise * np.float32(sched.init_noise_sigma)
    else:
        latents = sched.add_noise(image_latents, noise, start)
    masked = pixels * (mask_pixels < 0.5)  # the known part; the part to repaint set to grey (0)
    # (1, 1, h, w): the mask at latent size (nearest: every 8th pixel, as torch's interpolate)
    latent_mask = mask_pixels[:, :, :: m.vae_scale_factor, :: m.vae_scale_factor]
    if blending:
        gen.normal(shape[1:])  # diffusers encodes the masked image here even when it is unused: keep its draws
        condition = None
    else:
        masked_latents = gen.encode_image(masked)
        # (B, 1 + C, h, w)
        condition = np.repeat(np.concatenate([latent_mask, masked_latents], axis=1), gen.batch, axis=0)

    def blend(step_index: int, latents: np.ndarray) -> np.ndarray:
        """Latent blending for 4-channel models: keep the known region on the original's noise path."""
        known = image_latents
        if step_index + 1 < len(sched.timesteps):
            known = sched.add_noise(image_latents, noise, step_index + 1)
        return (1 - latent_mask) * known + latent_mask * latents

    latents = gen.denoise(sched, start, latents, feeds, condition=condition, after_step=blend if blending else None)
    result = gen.finish(sched, latents)
    if mask_blur > 0:
        result.images = _paste_back(result.images, pixels, imageio.soft_mask(mask_pixels, mask_blur))
    return result


def outpaint(
    gen: Generation,
    image: imageio.ImageInput,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    overlap: int = 16,
    mask_blur: float = 8.0,
    strength: float = 1.0,
) -> GenerationResult:
    """Pipeline.outpaint."""
    source = imageio.load_rgb(image)
    m = gen.manifest
    limit = min(m.default_height, m.default_width) // 2
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for side, pixels in sides.items():
        if not is_integer(pixels) or pixels < 0:
            raise InvalidInputError(f"{side} must be an integer >= 0, got {pixels!r}")
        if pixels > limit:
            raise InvalidInputError(
                f"{side}={pixels}: one outpaint pass extends a side by at most {limit} pixels "
                "(half the model's native size); outpaint the result again to go further"
            )
    if not any(sides.values()):
        raise InvalidInputError("outpaint needs an extension > 0 on at least one side (left/right/top/bottom)")
    if not is_integer(overlap) or overlap < 0:
        raise InvalidInputError(f"overlap must be an integer >= 0, got {overlap!r}")
    left, right, top, bottom, overlap = (int(n) for n in (left, right, top, bottom, overlap))
    multiple = m.size_multiple
    for side, size, low, high in (("height", source.height, top, bottom), ("width", source.width, left, right)):
        # the canvas also grows (bottom/right) to the size multiple: that side's mask takes the overlap too
        if (low or high or (size + low + high) % multiple) and overlap > size:
            raise InvalidInputError(
                f"overlap={overlap} is larger than the image {side} ({size} pixels) the canvas extends: "
                f"pass an overlap of at most {size}"
            )
    painted, mask = canvas.outpaint_canvas(np.asarray(source), left, right, top, bottom, overlap, multiple)
    painted_image = Image.fromarray(painted)
    r = gen.request  # the canvas is drawn at its own size (the ceiling permitting), or as asked
    own = r.height is None and r.width is None
    size = (painted_image.height, painted_image.width) if own else default_size(gen, painted_image)
    return _inpaint(gen, painted_image, Image.fromarray(mask), strength, mask_blur, size)


def _checked_mask_blur(mask_blur: float) -> float:
    if not is_real(mask_blur) or not math.isfinite(mask_blur) or mask_blur < 0:
        raise InvalidInputError(f"mask_blur must be a number >= 0, got {mask_blur!r}")
    return float(mask_blur)


def _require_a_step(sched: Scheduler, start: int, steps: int, strength: float) -> None:
    """Inpainting needs at least one denoising step: without one the masked area would be left as pure noise."""
    if start >= len(sched.timesteps):
        raise InvalidInputError(
            f"strength {strength!r} is too small: no denoising step would run with {steps} steps "
            f"(int({steps} * {strength!r}) = 0); raise strength or num_inference_steps"
        )


def _paste_back(images: list[Image.Image], original: np.ndarray, soft: np.ndarray) -> list[Image.Image]:
    """Blend each generated image over the original pixels: soft = 1 keeps the generated pixel."""
    keep = imageio.to_pil(original)[0]
    alpha = Image.fromarray((soft[0, 0] * 255).round().astype(np.uint8))
    return [Image.composite(image, keep, alpha) for image in images]
