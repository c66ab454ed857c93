"""img2img: an image transformed by a prompt; and its second-stage form (SDXL base -> refiner)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdtrt.engine.errors import InvalidInputError
from sdtrt.runtime import image as image_ops
from sdtrt.runtime.generation import Generation, GenerationResult
from sdtrt.runtime.tasks.checks import check_finite, check_size, default_size, require
from sdtrt.runtime.tasks.record import Task, image_input, option


@dataclass(frozen=True)
class Img2ImgOptions:
    image: image_ops.ImageInput = image_input("the input RGB image")  # or, with denoising_start, latents
    strength: float = option(0.8, "0 keeps the image, 1 ignores it", low=0.0, high=1.0)
    denoising_start: float | None = option(
        None,
        "continue a first stage's latents (as image) from this fraction of the schedule",
        kind="float",
        python_only=True,
    )


def img2img(gen: Generation, options: Img2ImgOptions) -> GenerationResult:
    if options.denoising_start is not None:
        require(gen, "img2img", unet_in_channels=4)
        return _continue(gen, options.image, options.denoising_start)
    require(gen, "img2img", unet_in_channels=4, needs=("vae_encoder",))
    source = image_ops.load_rgb(options.image)
    height, width = default_size(gen, source)
    check_size(gen, height, width)
    sched = gen.scheduler()
    start = sched.strength_start(gen.request.num_inference_steps, options.strength)
    feeds = gen.conditioning(height, width)

    image_latents = gen.encode_image(image_ops.image_to_array(source, height, width))  # (1, C, h, w)
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


TASK = Task(
    name="img2img",
    run=img2img,
    options=Img2ImgOptions,
    summary="transform an image by a prompt",
    doc="""Transform ``image`` by ``prompt``: it is noised to ``strength`` of the schedule and denoised.

The image is resized (Lanczos) to ``height`` x ``width``: a side left out keeps the image's aspect
ratio; with neither, its own size, scaled down (aspect kept) to the model's native area where larger
(a 4000x2000 photo on SD 1.5: 704x320), rounded down to the model's size multiple. As in
diffusers, only the last ``int(steps * strength)`` steps run; strength 1 starts from pure noise,
and a strength too small for one step returns the image's VAE round trip.

``image`` may instead be latents (B, C, h, w) left by a first stage stopped at
``denoising_end`` (SDXL base -> refiner): with ``denoising_start`` the same fraction, the
loop continues from them without adding noise, and ``strength`` is ignored.""",
    steps=50,
    size_help="the image's own size, rounded down",
    controlnets=True,
    batchable=True,
    batch_options=("strength",),
)
