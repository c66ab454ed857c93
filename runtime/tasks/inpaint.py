"""inpaint: repaint the white part of a mask.

Inpainting models (a 9-channel UNet) see the mask and the masked image at every step; any ordinary
model inpaints by latent blending: after each step the known region is replaced by the original
latents re-noised to the next timestep, as diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdtrt.engine.errors import InvalidInputError
from sdtrt.runtime import image as image_ops
from sdtrt.runtime.generation import Generation, GenerationResult
from sdtrt.runtime.schedulers import Scheduler
from sdtrt.runtime.tasks.checks import check_size, default_size, require
from sdtrt.runtime.tasks.record import Task, image_input, option

STRENGTH_HELP = "how far to noise the masked part: 1 repaints it from noise"


@dataclass(frozen=True)
class InpaintOptions:
    image: image_ops.ImageInput = image_input("the input RGB image")
    mask: image_ops.ImageInput = image_input("a mask of the image's size: white = repaint")
    strength: float = option(1.0, STRENGTH_HELP, low=0.0, high=1.0)
    mask_blur: float = option(0.0, "feather the paste-back of the original pixels by this many pixels", low=0.0)


def inpaint(gen: Generation, options: InpaintOptions) -> GenerationResult:
    source, mask_image = image_ops.load_rgb(options.image), image_ops.load_mask(options.mask)
    return repaint(gen, source, mask_image, options.strength, options.mask_blur, default_size(gen, source))


def repaint(
    gen: Generation,
    source: Image.Image,
    mask_image: Image.Image,
    strength: float,
    mask_blur: float,
    size: tuple[int, int],
) -> GenerationResult:
    """Repaint ``mask_image``'s white part of ``source`` at ``size`` (height, width)."""
    require(gen, "inpaint", needs=("vae_encoder",))
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

    pixels = image_ops.image_to_array(source, height, width)  # (1, 3, H, W) in [-1, 1]
    mask_pixels = image_ops.mask_to_array(mask_image, height, width)  # (1, 1, H, W): 1 = repaint
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
        result.images = _paste_back(result.images, pixels, image_ops.soft_mask(mask_pixels, mask_blur))
    return result


def _require_a_step(sched: Scheduler, start: int, steps: int, strength: float) -> None:
    """Inpainting needs at least one denoising step: without one the masked area would be left as pure noise."""
    if start >= len(sched.timesteps):
        raise InvalidInputError(
            f"strength {strength!r} is too small: no denoising step would run with {steps} steps "
            f"(int({steps} * {strength!r}) = 0); raise strength or num_inference_steps"
        )


def _paste_back(images: list[Image.Image], original: np.ndarray, soft: np.ndarray) -> list[Image.Image]:
    """Blend each generated image over the original pixels: soft = 1 keeps the generated pixel."""
    keep = image_ops.to_pil(original)[0]
    alpha = Image.fromarray((soft[0, 0] * 255).round().astype(np.uint8))
    return [Image.composite(image, keep, alpha) for image in images]


TASK = Task(
    name="inpaint",
    run=inpaint,
    options=InpaintOptions,
    summary="repaint the white part of a mask",
    doc="""Repaint the white part of ``mask`` (same size as ``image``) by ``prompt``, at img2img's default size.

Inpainting models (a 9-channel UNet) see the mask and the masked image at every step; any
ordinary model inpaints by latent blending, as diffusers does. Own options: ``strength``
as img2img's, except that one too small for a single step is an error; ``mask_blur`` > 0
pastes the original pixels back over the result through a mask feathered by a Gaussian of
that radius (in pixels), hiding seams; 0 (the default) returns the model's output as
diffusers does.""",
    steps=50,
    size_help="the image's own size, rounded down",
    controlnets=True,
    batchable=True,
    batch_options=("strength", "mask_blur"),
)
