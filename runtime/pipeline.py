"""Stable Diffusion pipelines over an sdtrt artifact folder: txt2img, img2img, inpaint, outpaint, upscale.

Each is thin orchestration of tokenizer -> text encoder -> denoising loop (NumPy scheduler, UNet
session) -> VAE decoder. The networks run in sessions of whichever backend was chosen
(sdtrt.engine); the runtime never asks which.

Randomness comes from one NumPy Generator per call (``seed``, or pass ``rng``: any object with
NumPy's ``standard_normal(size, dtype)``). Draws follow diffusers' order — VAE latent samples,
initial noise, then each stochastic step — so a seed means the same image on every backend, and a
generator that replays torch's draws reproduces diffusers exactly (the parity tests do this).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from sdtrt.engine.backends import BackendChoice, choose_backend, component_precision, load_session
from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Manifest, load_manifest
from sdtrt.engine.session import Session
from sdtrt.engine.weights import WeightMap, load_weight_map
from sdtrt.runtime import canvas
from sdtrt.runtime import image as imageio
from sdtrt.runtime.lora import LoraAdapter, compose, read_lora
from sdtrt.runtime.schedulers import Scheduler, make_scheduler
from sdtrt.runtime.tokenizer import CLIPTokenizer

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (steps done, steps in all)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the SDXL refiner's micro-conditioning (diffusers' defaults)


class NormalSource(Protocol):
    """Where Gaussian noise comes from: numpy.random.Generator, or anything with its standard_normal."""

    def standard_normal(self, size: Any, dtype: Any) -> np.ndarray: ...


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: np.ndarray  # (B, C, h, w) float32: the denoised latents, before the VAE
    seed: int | None  # None when the caller passed its own rng
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    backend: str = ""
    scheduler: str = ""


@dataclass
class _Run:
    """The per-call state shared by every pipeline: validated options, noise source, timings, progress."""

    prompts: list[str]
    negatives: list[str] | None  # None: no negative prompt given
    num_images: int
    guidance_scale: float
    cfg: bool  # classifier-free guidance: the UNet batch holds an unconditional half first
    rng: NormalSource
    seed: int | None
    progress: ProgressCallback | None
    start: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images

    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(self.rng.standard_normal(shape, dtype=np.float32), dtype=np.float32)

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


class Pipeline:
    """A loaded artifact folder. ``Pipeline.load(dir)`` then ``pipe.txt2img("a prompt")`` and friends."""

    def __init__(self, folder: Path, manifest: Manifest, backend: BackendChoice) -> None:
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        # text encoder -> its tokenizer; SDXL concatenates two encoders' hidden states in this order
        self.tokenizers = {name: CLIPTokenizer.from_dir(folder / tok) for name, tok in manifest.tokenizers.items()}
        unet = manifest.component_file("unet", component_precision(backend, manifest, "unet"))
        self._unet_inputs = {spec.name: spec for spec in unet.inputs}
        self._sessions: dict[str, Session] = {}
        self._loras: dict[str, tuple[LoraAdapter, float]] = {}  # name -> (adapter, scale), in loading order
        self._weight_maps: dict[str, WeightMap] | None = None  # read on the first load_lora

    @classmethod
    def load(cls, folder: str | os.PathLike[str], backend: str = "auto") -> Pipeline:
        """Open an artifact folder written by ``sdtrt export``; ``backend`` is "auto" or a name in BACKENDS."""
        folder = Path(folder)
        manifest = load_manifest(folder)
        pipe = cls(folder, manifest, choose_backend(backend))
        for component in (*manifest.tokenizers, "unet", "vae_decoder"):
            pipe.session(component)
        return pipe

    def session(self, component: str) -> Session:
        """The session of ``component``, opened on first use."""
        if component not in self._sessions:
            session = load_session(self.backend, self.folder, self.manifest, component)
            if self._loras and component in self._lora_maps():
                session.set_weights(compose(self._lora_maps()[component], component, list(self._loras.values())))
            self._sessions[component] = session
        return self._sessions[component]

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------
    # LoRA adapters

    def load_lora(self, path: str | os.PathLike[str], name: str | None = None, scale: float = 1.0) -> str:
        """Apply the LoRA adapter in ``path`` (.safetensors; diffusers/PEFT or kohya keys) at ``scale``.

        Returns its name (default: the file name without extension), which set_lora_scale and
        unload_lora take. Adapters add up: weights = base + sum(scale_i * delta_i), recomputed from
        the export's base weights at every change, so any order of loads, scales and unloads
        leaves no residue. No re-export: ONNX Runtime sessions reopen with the new initializers,
        TensorRT plans are refitted in place. A file that does not fit this model is one error and
        changes nothing.
        """
        name = Path(path).stem if name is None else name
        if name in self._loras:
            raise InvalidInputError(f"a LoRA named {name!r} is loaded already: unload it first or pass another name")
        _check_lora_scale(scale)
        maps = self._lora_maps()
        if not maps:
            source = self.manifest.source.get("path", "MODEL")
            raise InvalidInputError(
                f"{self.folder} has no weight maps, which LoRA needs: re-export it with this sdtrt "
                f"(`sdtrt export {source} --out {self.folder} --overwrite`)"
            )
        adapter = read_lora(path, maps)
        self._set_loras({**self._loras, name: (adapter, float(scale))})
        log.info("LoRA %s: %d layers at scale %g", name, adapter.size, scale)
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change the scale of the loaded adapter ``name`` (0 turns it off without unloading it)."""
        self._check_lora_name(name)
        _check_lora_scale(scale)
        self._set_loras({**self._loras, name: (self._loras[name][0], float(scale))})

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the adapter ``name``, or all of them (None): what is left runs on the base weights plus the rest."""
        if name is not None:
            self._check_lora_name(name)
        self._set_loras({} if name is None else {k: v for k, v in self._loras.items() if k != name})

    @property
    def loras(self) -> dict[str, float]:
        """The loaded adapters and their scales, in loading order."""
        return {name: scale for name, (_, scale) in self._loras.items()}

    def _check_lora_name(self, name: str) -> None:
        if name not in self._loras:
            raise InvalidInputError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self._loras) or 'none'})")

    def _lora_maps(self) -> dict[str, WeightMap]:
        """The weight maps of the components this backend runs (the UNet and text encoders have them)."""
        if self._weight_maps is None:
            self._weight_maps = {}
            for component in self.manifest.components:
                precision = component_precision(self.backend, self.manifest, component)
                file = self.manifest.component_file(component, precision)
                if file.weights is not None:
                    self._weight_maps[component] = load_weight_map(self.folder / file.weights)
        return self._weight_maps

    def _set_loras(self, loras: dict[str, tuple[LoraAdapter, float]]) -> None:
        """Compose the weights of every open session for ``loras`` from the base and hand them over
        (a session whose weights stay the base ones does nothing)."""
        adapters = list(loras.values())
        for component, weight_map in self._lora_maps().items():
            if component in self._sessions:
                self._sessions[component].set_weights(compose(weight_map, component, adapters))
        self._loras = loras

    # ----------------------------------------------------------------------------------------------
    # The five pipelines

    def txt2img(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        latents: np.ndarray | None = None,
        progress: ProgressCallback | None = None,
        rng: NormalSource | None = None,
        denoising_end: float | None = None,
        decode: bool = True,
    ) -> GenerationResult:
        """Generate ``num_images`` images per prompt from noise.

        ``scheduler`` is a name from sdtrt.runtime.schedulers.SCHEDULERS (default: the model's own);
        ``guidance_scale`` > 1 turns on classifier-free guidance with ``negative_prompt`` (default "");
        ``latents`` (B, C, H/8, W/8) replaces the seeded initial noise. ``denoising_end`` in (0, 1)
        stops early, leaving the rest of the schedule to a second stage (SDXL's refiner, through
        img2img with ``denoising_start``); ``decode=False`` skips the VAE and returns only latents.
        Timings in the result, in seconds: text_encoder, unet (all steps), scheduler (the NumPy
        loop outside the UNet), vae_decode and total.
        """
        self._require("txt2img", unet_in_channels=4)
        if self._refiner:
            raise InvalidInputError("the SDXL refiner is a second stage: use img2img (with denoising_start)")
        m = self.manifest
        height = m.default_height if height is None else height
        width = m.default_width if width is None else width
        self._check_size(height, width)
        run = self._start(prompt, negative_prompt, num_inference_steps, guidance_scale, num_images, seed, rng, progress)
        sched = self._scheduler(scheduler, num_inference_steps)
        stop = _end_index(sched, denoising_end)
        feeds = self._conditioning(run, height, width)

        shape = (run.batch, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        if latents is None:
            latents = run.normal(shape)
        elif not isinstance(latents, np.ndarray):
            raise InvalidInputError(f"latents must be a NumPy array of shape {shape}, not {type(latents).__name__}")
        elif latents.shape != shape:
            raise InvalidInputError(f"latents have shape {latents.shape}, expected {shape}")
        latents = latents.astype(np.float32) * np.float32(sched.init_noise_sigma)  # (B, C, H/8, W/8) float32
        latents = self._denoise(run, sched, 0, latents, feeds, stop=stop)
        return self._finish(run, sched, latents, decode)

    def img2img(
        self,
        prompt: str | Sequence[str],
        image: imageio.ImageInput,
        strength: float = 0.8,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        progress: ProgressCallback | None = None,
        rng: NormalSource | None = None,
        denoising_start: float | None = None,
    ) -> GenerationResult:
        """Transform ``image`` by ``prompt``: the image is noised to ``strength`` of the schedule and denoised.

        The image is resized (Lanczos) to ``height`` x ``width``, by default to its own size rounded
        down to the model's size multiple. As in diffusers, only the last ``int(steps * strength)``
        steps run; strength 1 starts from pure noise, and a strength too small for one step returns
        the image's VAE round trip.

        ``image`` may instead be latents (B, C, h, w) left by a first stage stopped at
        ``denoising_end`` (SDXL base -> refiner): with ``denoising_start`` the same fraction, the
        loop continues from them without adding noise, and ``strength`` is ignored.
        """
        self._require("img2img", unet_in_channels=4, needs=() if denoising_start is not None else ("vae_encoder",))
        _check_strength(strength)
        m = self.manifest
        if denoising_start is not None:
            return self._continue(
                prompt,
                image,
                denoising_start,
                negative_prompt,
                num_inference_steps,
                guidance_scale,
                seed,
                num_images,
                scheduler,
                progress,
                rng,
            )
        source = imageio.load_rgb(image)
        height, width = imageio.fit_size(source, height, width, m.size_multiple)
        self._check_size(height, width)
        run = self._start(prompt, negative_prompt, num_inference_steps, guidance_scale, num_images, seed, rng, progress)
        sched = self._scheduler(scheduler, num_inference_steps)
        start = _start_index(sched, num_inference_steps, strength)
        feeds = self._conditioning(run, height, width)

        image_latents = self._encode_image(run, imageio.image_to_array(source, height, width))  # (1, C, h, w)
        image_latents = np.repeat(image_latents, run.batch, axis=0)
        noise = run.normal(image_latents.shape)
        if start < len(sched.timesteps):
            latents = sched.add_noise(image_latents, noise, start)
            latents = self._denoise(run, sched, start, latents, feeds)
        else:
            latents = image_latents
        return self._finish(run, sched, latents)

    def _continue(
        self,
        prompt: str | Sequence[str],
        latents: np.ndarray,
        denoising_start: float,
        negative_prompt: str | Sequence[str] | None,
        num_inference_steps: int,
        guidance_scale: float,
        seed: int | None,
        num_images: int,
        scheduler: str | None,
        progress: ProgressCallback | None,
        rng: NormalSource | None,
    ) -> GenerationResult:
        """img2img's second-stage form: denoise the given latents from ``denoising_start`` of the schedule."""
        m = self.manifest
        if not isinstance(latents, np.ndarray) or latents.ndim != 4 or latents.shape[1] != m.latent_channels:
            raise InvalidInputError(
                f"with denoising_start, image must be latents of shape (B, {m.latent_channels}, h, w) "
                "from a first stage (txt2img with denoising_end and decode=False)"
            )
        height, width = latents.shape[2] * m.vae_scale_factor, latents.shape[3] * m.vae_scale_factor
        self._check_size(height, width)
        run = self._start(prompt, negative_prompt, num_inference_steps, guidance_scale, num_images, seed, rng, progress)
        if latents.shape[0] != run.batch:
            raise InvalidInputError(f"{latents.shape[0]} latents for a batch of {run.batch} images")
        sched = self._scheduler(scheduler, num_inference_steps)
        start = _continue_index(sched, denoising_start)
        feeds = self._conditioning(run, height, width)
        latents = self._denoise(run, sched, start, latents.astype(np.float32), feeds)
        return self._finish(run, sched, latents)

    def inpaint(
        self,
        prompt: str | Sequence[str],
        image: imageio.ImageInput,
        mask: imageio.ImageInput,
        strength: float = 1.0,
        mask_blur: float = 0.0,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        progress: ProgressCallback | None = None,
        rng: NormalSource | None = None,
    ) -> GenerationResult:
        """Repaint the white part of ``mask`` (same size as ``image``) by ``prompt``.

        Inpainting models (a 9-channel UNet) see the mask and the masked image at every step; any
        ordinary model inpaints by latent blending: after each step the known region is replaced
        by the original latents re-noised to the next timestep, as diffusers does. ``mask_blur`` > 0
        pastes the original pixels back over the result through a mask feathered by a Gaussian of
        that radius (in pixels), hiding seams; 0 returns the model's output as diffusers does.
        As diffusers' inpainting, a ``strength`` too small for one step (int(steps * strength) = 0)
        is an error (img2img instead returns the image's VAE round trip).
        """
        self._require("inpaint", needs=("vae_encoder",))
        _check_strength(strength)
        _check_mask_blur(mask_blur)
        source, mask_image = imageio.load_rgb(image), imageio.load_mask(mask)
        if mask_image.size != source.size:
            raise InvalidInputError(
                f"mask is {mask_image.width}x{mask_image.height} but the image is {source.width}x{source.height}: "
                "they must be the same size"
            )
        height, width = imageio.fit_size(source, height, width, self.manifest.size_multiple)
        self._check_size(height, width)
        run = self._start(prompt, negative_prompt, num_inference_steps, guidance_scale, num_images, seed, rng, progress)
        sched = self._scheduler(scheduler, num_inference_steps)
        start = _start_index(sched, num_inference_steps, strength)
        _require_a_step(sched, start, num_inference_steps, strength)
        feeds = self._conditioning(run, height, width)

        pixels = imageio.image_to_array(source, height, width)  # (1, 3, H, W) in [-1, 1]
        mask_pixels = imageio.mask_to_array(mask_image, height, width)  # (1, 1, H, W): 1 = repaint
        blending = self.manifest.unet_in_channels == 4
        m = self.manifest
        shape = (run.batch, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        image_latents = None
        if blending or strength < 1.0:
            image_latents = np.repeat(self._encode_image(run, pixels), run.batch, axis=0)
        noise = run.normal(shape)
        if strength == 1.0:
            latents = noise * np.float32(sched.init_noise_sigma)
        else:
            latents = sched.add_noise(image_latents, noise, start)
        masked = pixels * (mask_pixels < 0.5)  # the known part; the part to repaint set to grey (0)
        # (1, 1, h, w): the mask at latent size (nearest: every 8th pixel, as torch's interpolate)
        latent_mask = mask_pixels[:, :, :: m.vae_scale_factor, :: m.vae_scale_factor]
        if blending:
            run.normal(shape[1:])  # diffusers encodes the masked image here even when it is unused: keep its draws
            condition = None
        else:
            masked_latents = self._encode_image(run, masked)
            # (B, 1 + C, h, w)
            condition = np.repeat(np.concatenate([latent_mask, masked_latents], axis=1), run.batch, axis=0)

        def blend(step_index: int, latents: np.ndarray) -> np.ndarray:
            """Latent blending for 4-channel models: keep the known region on the original's noise path."""
            known = image_latents
            if step_index + 1 < len(sched.timesteps):
                known = sched.add_noise(image_latents, noise, step_index + 1)
            return (1 - latent_mask) * known + latent_mask * latents

        latents = self._denoise(
            run, sched, start, latents, feeds, condition=condition, after_step=blend if blending else None
        )
        result = self._finish(run, sched, latents)
        if mask_blur > 0:
            result.images = _paste_back(result.images, pixels, imageio.soft_mask(mask_pixels, mask_blur))
        return result

    def outpaint(
        self,
        prompt: str | Sequence[str],
        image: imageio.ImageInput,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        overlap: int = 16,
        mask_blur: float = 8.0,
        **options: Any,
    ) -> GenerationResult:
        """Extend ``image`` by the given pixels on each side and paint the new area by ``prompt``.

        The canvas is the image with its border pixels stretched outwards, grown on the right and
        bottom to the model's size multiple; the mask covers the new area plus ``overlap`` pixels of
        the old one, and the result is blended back over the original through a mask feathered by
        ``mask_blur``. One pass extends each side by at most half the model's native size; call
        again on the result for more. Other options are inpaint's.
        """
        source = imageio.load_rgb(image)
        limit = min(self.manifest.default_height, self.manifest.default_width) // 2
        sides = {"left": left, "right": right, "top": top, "bottom": bottom}
        for side, pixels in sides.items():
            if not isinstance(pixels, int) or pixels < 0:
                raise InvalidInputError(f"{side} must be an integer >= 0, got {pixels!r}")
            if pixels > limit:
                raise InvalidInputError(
                    f"{side}={pixels}: one outpaint pass extends a side by at most {limit} pixels "
                    "(half the model's native size); outpaint the result again to go further"
                )
        if not any(sides.values()):
            raise InvalidInputError("outpaint needs an extension > 0 on at least one side (left/right/top/bottom)")
        if not isinstance(overlap, int) or overlap < 0:
            raise InvalidInputError(f"overlap must be an integer >= 0, got {overlap!r}")
        multiple = self.manifest.size_multiple
        for side, size, low, high in (("height", source.height, top, bottom), ("width", source.width, left, right)):
            # the canvas also grows (bottom/right) to the size multiple: that side's mask takes the overlap too
            if (low or high or (size + low + high) % multiple) and overlap > size:
                raise InvalidInputError(
                    f"overlap={overlap} is larger than the image {side} ({size} pixels) the canvas extends: "
                    f"pass an overlap of at most {size}"
                )
        painted, mask = canvas.outpaint_canvas(np.asarray(source), left, right, top, bottom, overlap, multiple)
        return self.inpaint(prompt, Image.fromarray(painted), Image.fromarray(mask), mask_blur=mask_blur, **options)

    def upscale(
        self,
        prompt: str | Sequence[str],
        image: imageio.ImageInput,
        noise_level: int = 20,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        tiling: bool = True,
        progress: ProgressCallback | None = None,
        rng: NormalSource | None = None,
    ) -> GenerationResult:
        """Upscale ``image`` 4x with an x4-upscaler export, guided by ``prompt``.

        The low-resolution image is rounded down to the UNet's size step, noised to ``noise_level``
        and fed to the UNet beside the latents. Inputs larger than ``tile_size`` (default: the
        model's native input size) are cut into tiles overlapping by ``tile_overlap`` low-res pixels
        (default: 16, at most a quarter tile), each denoised on its own and feathered together, so
        memory stays bounded; ``tiling=False`` refuses such inputs instead.
        """
        self._require("upscale", families=("upscaler",))
        m = self.manifest
        step = m.size_multiple // m.vae_scale_factor  # the low-res image is the latent: it needs the UNet's step
        tile_size = m.default_height // m.vae_scale_factor if tile_size is None else tile_size
        tile_overlap = min(16, tile_size // 4) if tile_overlap is None else tile_overlap
        max_level = m.max_noise_level or 0
        if not isinstance(noise_level, int) or not 0 <= noise_level <= max_level:
            raise InvalidInputError(f"noise_level must be an integer from 0 to {max_level}, got {noise_level!r}")
        if not isinstance(tile_size, int) or tile_size < step or tile_size % step:
            raise InvalidInputError(f"tile_size must be a positive multiple of {step}, got {tile_size!r}")
        if not isinstance(tile_overlap, int) or not 0 <= tile_overlap < tile_size // 2:
            raise InvalidInputError(
                f"tile_overlap must be an integer from 0 to {tile_size // 2 - 1}, got {tile_overlap!r}"
            )
        source = imageio.load_rgb(image)
        height, width = imageio.fit_size(source, None, None, step)
        if not tiling and max(height, width) > tile_size:
            raise InvalidInputError(
                f"input {width}x{height} is larger than the tile budget {tile_size}x{tile_size}: "
                "allow tiling, or pass a larger tile_size if memory allows"
            )
        run = self._start(prompt, negative_prompt, num_inference_steps, guidance_scale, num_images, seed, rng, progress)
        sched = self._scheduler(scheduler, num_inference_steps)
        feeds = self._conditioning(run, height, width)

        low_res = imageio.image_to_array(source, height, width, resample="bicubic")  # (1, 3, h, w) in [-1, 1]
        alpha_cumprod = float(make_scheduler("ddim", m.low_res_scheduler or {}).alphas_cumprod[noise_level])
        noisy = np.float32(alpha_cumprod**0.5) * low_res + np.float32((1 - alpha_cumprod) ** 0.5) * run.normal(
            low_res.shape
        )
        latents = run.normal((run.batch, m.latent_channels, height, width)) * np.float32(sched.init_noise_sigma)
        condition = np.repeat(noisy, run.batch, axis=0)  # (B, 3, h, w)
        feeds["noise_level"] = np.full(run.batch * (2 if run.cfg else 1), noise_level, dtype=np.int32)

        scale = m.vae_scale_factor
        out = np.zeros((run.batch, 3, height * scale, width * scale), dtype=np.float32)  # weighted sum of tiles
        weight = np.zeros((1, 1, height * scale, width * scale), dtype=np.float32)
        final_latents = np.zeros_like(latents)
        for index, (y, x, h, w) in enumerate(canvas.tile_grid(height, width, tile_size, tile_overlap)):
            if index:
                sched.set_timesteps(num_inference_steps)  # each tile runs the whole schedule afresh
            low = np.s_[:, :, y : y + h, x : x + w]
            high = np.s_[:, :, y * scale : (y + h) * scale, x * scale : (x + w) * scale]
            final_latents[low] = self._denoise(run, sched, 0, latents[low], feeds, condition=condition[low])
            edges = (y > 0, x > 0, y + h < height, x + w < width)  # sides that another tile overlaps
            ramp = canvas.feather(h * scale, w * scale, tile_overlap * scale, *edges)
            out[high] += self._decode(run, final_latents[low]) * ramp
            weight[high] += ramp
        run.timings["total"] = time.perf_counter() - run.start
        images = imageio.to_pil(out / weight)
        return GenerationResult(images, final_latents, run.seed, run.timings, self.backend.kind, sched.name)

    # ----------------------------------------------------------------------------------------------
    # Shared pieces

    def _require(
        self,
        task: str,
        families: tuple[str, ...] = ("sd1", "sd2", "sdxl"),
        unet_in_channels: int | None = None,
        needs: tuple[str, ...] = (),
    ) -> None:
        """One clear error when this export cannot serve ``task``."""
        m = self.manifest
        if m.family not in families:
            use = "upscale" if m.family == "upscaler" else "txt2img, img2img, inpaint or outpaint"
            raise InvalidInputError(
                f"{task} works on {'/'.join(families)} models; {self.folder} holds a {m.family} model: use {use}"
            )
        if unet_in_channels is not None and m.unet_in_channels != unet_in_channels:
            raise InvalidInputError(
                f"{task} needs a {unet_in_channels}-channel UNet; {self.folder} holds an inpainting model "
                f"({m.unet_in_channels} channels): use inpaint or outpaint"
            )
        for component in needs:
            if component not in m.components:
                source = m.source.get("path", "MODEL")
                raise InvalidInputError(
                    f"{task} needs the {component} network, which {self.folder} lacks: re-export with "
                    f"`sdtrt export {source} --out {self.folder} --overwrite` (all networks by default)"
                )

    @property
    def _refiner(self) -> bool:
        """An SDXL refiner: its micro-conditioning carries an aesthetic score instead of the target size."""
        time_ids = self._unet_inputs.get("time_ids")
        return time_ids is not None and time_ids.shape[1] == 5

    def _check_size(self, height: int, width: int) -> None:
        m = self.manifest
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

    def _start(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None,
        steps: int,
        guidance_scale: float,
        num_images: int,
        seed: int | None,
        rng: NormalSource | None,
        progress: ProgressCallback | None,
    ) -> _Run:
        """Validate the options every pipeline shares and set up the noise source."""
        prompts = [prompt] if isinstance(prompt, str) else (_many(prompt) or [])
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InvalidInputError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidInputError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise InvalidInputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise InvalidInputError(f"num_images must be an integer >= 1, got {num_images!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
            raise InvalidInputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if rng is None:
            if seed is None:
                seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0])
            rng = np.random.default_rng(seed)
        elif seed is not None:
            raise InvalidInputError("pass a seed or an rng, not both")
        negatives = None if negative_prompt is None else _negative_prompts(negative_prompt, len(prompts))
        # diffusers' rule: guidance 1 (or less) is the plain conditional model; LCM-distilled UNets take the
        # guidance scale as an input instead (timestep_cond) and never double the batch
        cfg = guidance_scale > 1.0 and "timestep_cond" not in self._unet_inputs
        return _Run(prompts, negatives, num_images, float(guidance_scale), cfg, rng, seed, progress)

    def _scheduler(self, name: str | None, steps: int) -> Scheduler:
        """The scheduler ``name`` (default: the model's own), configured from the model and set to ``steps``."""
        sched = make_scheduler(name, self.manifest.scheduler)
        sched.set_timesteps(steps)
        return sched

    def _run_all(self, component: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        """Run a network, casting inputs to its dtypes and float outputs to float32."""
        session = self.session(component)
        cast = {name: array.astype(session.inputs[name].dtype, copy=False) for name, array in feeds.items()}
        return {name: value.astype(np.float32, copy=False) for name, value in session.run(cast).items()}

    def _run(self, component: str, **feeds: np.ndarray) -> np.ndarray:
        """Run a one-output network."""
        (output,) = self._run_all(component, **feeds).values()
        return output

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Text embeddings: hidden states (N, 77, D) of every text encoder side by side, and the pooled
        (N, P) embedding of the one that has it (SDXL's second), else None."""
        hidden, pooled = [], None
        for component, tokenizer in self.tokenizers.items():
            outputs = self._run_all(component, input_ids=tokenizer(list(prompts)))
            hidden.append(outputs["hidden_states"])
            pooled = outputs.get("text_embeds", pooled)
        return np.concatenate(hidden, axis=-1), pooled

    def _conditioning(self, run: _Run, height: int, width: int) -> dict[str, np.ndarray]:
        """The UNet's conditioning inputs, each (B, ...) or (2B, ...) with the unconditional half first under CFG.

        encoder_hidden_states always; SDXL's pooled text_embeds and time_ids (original size, crop
        origin, then target size or, for the refiner, an aesthetic score); an LCM UNet's timestep_cond.
        """
        t0 = time.perf_counter()
        hidden, pooled = self.encode_prompts(run.prompts)
        feeds = {"encoder_hidden_states": hidden}
        if pooled is not None:
            feeds["text_embeds"] = pooled
        if "time_ids" in self._unet_inputs:
            score = (AESTHETIC_SCORE,) if self._refiner else (height, width)
            feeds["time_ids"] = np.array([[height, width, 0, 0, *score]] * len(run.prompts), dtype=np.float32)
        if "timestep_cond" in self._unet_inputs:
            size = self._unet_inputs["timestep_cond"].shape[1]
            feeds["timestep_cond"] = guidance_embedding(run.guidance_scale - 1.0, size, len(run.prompts))
        feeds = {name: np.repeat(value, run.num_images, axis=0) for name, value in feeds.items()}
        if run.cfg:
            if run.negatives is None and self.manifest.force_zeros_for_empty_prompt:
                negative = {name: np.zeros_like(value) for name, value in feeds.items() if name != "time_ids"}
            else:
                hidden, pooled = self.encode_prompts(run.negatives or [""] * len(run.prompts))
                negative = {"encoder_hidden_states": np.repeat(hidden, run.num_images, axis=0)}
                if pooled is not None:
                    negative["text_embeds"] = np.repeat(pooled, run.num_images, axis=0)
            if "time_ids" in feeds:
                negative["time_ids"] = feeds["time_ids"].copy()
                if self._refiner:
                    negative["time_ids"][:, 4] = NEGATIVE_AESTHETIC_SCORE
            feeds = {name: np.concatenate([negative[name], value]) for name, value in feeds.items()}
        run.add_time("text_encoder", time.perf_counter() - t0)
        return feeds

    def _encode_image(self, run: _Run, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/8, W/8), sampled from the VAE's posterior."""
        t0 = time.perf_counter()
        moments = self._run("vae_encoder", image=pixels)  # (N, 2C, h, w): mean and log-variance
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        latents = (mean + std * run.normal(mean.shape)) * np.float32(self.manifest.vae_scaling_factor)
        run.add_time("vae_encode", time.perf_counter() - t0)
        return latents.astype(np.float32)

    def _denoise(
        self,
        run: _Run,
        sched: Scheduler,
        start: int,
        latents: np.ndarray,
        feeds: dict[str, np.ndarray],
        condition: np.ndarray | None = None,
        after_step: Callable[[int, np.ndarray], np.ndarray] | None = None,
        stop: int | None = None,
    ) -> np.ndarray:
        """The loop over timestep indices [start, stop): UNet (+ CFG), scheduler step, optional per-step blend.

        ``feeds`` are the UNet's conditioning inputs (see _conditioning); ``condition`` (B, c, h, w) is
        concatenated to the scaled latents on channels (inpainting mask and masked latents, or the
        upscaler's low-res image).
        """
        stop = len(sched.timesteps) if stop is None else stop
        unet_seconds = 0.0
        t0 = time.perf_counter()
        if condition is not None and run.cfg:
            condition = np.concatenate([condition, condition])
        for i in range(start, stop):
            model_input = np.concatenate([latents, latents]) if run.cfg else latents
            model_input = sched.scale_model_input(model_input, i)  # (2B or B, C, h, w) float32
            if condition is not None:
                model_input = np.concatenate([model_input, condition], axis=1)
            timestep = np.full(model_input.shape[0], sched.timesteps[i], dtype=np.float32)
            u0 = time.perf_counter()
            noise_pred = self._run("unet", sample=model_input, timestep=timestep, **feeds)
            unet_seconds += time.perf_counter() - u0
            if run.cfg:
                uncond_pred, text_pred = np.split(noise_pred, 2)
                noise_pred = uncond_pred + np.float32(run.guidance_scale) * (text_pred - uncond_pred)
            noise = run.normal(latents.shape) if sched.needs_noise(i) else None
            latents = sched.step(noise_pred, i, latents, noise=noise)
            if after_step is not None:
                latents = after_step(i, latents)
            if run.progress is not None:
                run.progress(i - start + 1, stop - start)
        run.add_time("unet", unet_seconds)
        run.add_time("scheduler", time.perf_counter() - t0 - unet_seconds)
        return latents

    def _decode(self, run: _Run, latents: np.ndarray) -> np.ndarray:
        """(B, C, h, w) latents -> (B, 3, H, W) float32 image in [-1, 1]."""
        t0 = time.perf_counter()
        image = self._run("vae_decoder", latent=latents / np.float32(self.manifest.vae_scaling_factor))
        run.add_time("vae_decode", time.perf_counter() - t0)
        return image

    def _finish(self, run: _Run, sched: Scheduler, latents: np.ndarray, decode: bool = True) -> GenerationResult:
        images = imageio.to_pil(self._decode(run, latents)) if decode else []
        run.timings["total"] = time.perf_counter() - run.start
        return GenerationResult(images, latents, run.seed, run.timings, self.backend.kind, sched.name)


def _check_lora_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidInputError(f"a LoRA scale must be a finite number, got {scale!r}")


def _many(value: object) -> list[Any] | None:
    """The items of a list (or other iterable) of prompts; None for what is not iterable (None, a number)."""
    return list(value) if isinstance(value, Iterable) else None


def _negative_prompts(negative_prompt: str | Sequence[str], count: int) -> list[str]:
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = _many(negative_prompt)
    if negatives is None or not all(isinstance(n, str) for n in negatives):
        raise InvalidInputError(
            f"negative_prompt must be a string or a list of strings, one per prompt; got {negative_prompt!r}"
        )
    if len(negatives) != count:
        raise InvalidInputError(f"{len(negatives)} negative prompts for {count} prompts: give one per prompt")
    return negatives


def guidance_embedding(w: float, size: int, count: int) -> np.ndarray:
    """(count, size) float32 sinusoidal embedding of an LCM UNet's guidance input w = guidance_scale - 1.

    As diffusers' get_guidance_scale_embedding: w * 1000 through sin/cos at geometric frequencies.
    """
    half = size // 2
    step = np.log(np.float32(10000.0)) / np.float32(half - 1)  # float32 throughout, as torch computes it
    frequencies = np.exp(np.arange(half, dtype=np.float32) * -step)
    angles = np.float32(w * 1000.0) * frequencies
    embedding = np.concatenate([np.sin(angles), np.cos(angles)])
    if size % 2:
        embedding = np.append(embedding, np.float32(0))
    return np.tile(embedding.astype(np.float32), (count, 1))


def _check_fraction(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise InvalidInputError(f"{name} must be a number strictly between 0 and 1, got {value!r}")


def _cutoff(sched: Scheduler, fraction: float) -> int:
    """The training timestep where a two-stage split at ``fraction`` of the schedule falls (diffusers' rule)."""
    return round(sched.num_train_timesteps - fraction * sched.num_train_timesteps)


def _end_index(sched: Scheduler, denoising_end: float | None) -> int:
    """Where a first stage stops: after the timesteps at or above the cutoff (SDXL base's denoising_end)."""
    if denoising_end is None:
        return len(sched.timesteps)
    _check_fraction("denoising_end", denoising_end)
    return int(np.sum(sched.timesteps >= _cutoff(sched, denoising_end)))


def _continue_index(sched: Scheduler, denoising_start: float) -> int:
    """Where a second stage starts: at the first timestep below the cutoff (the refiner's denoising_start)."""
    _check_fraction("denoising_start", denoising_start)
    remaining = int(np.sum(sched.timesteps < _cutoff(sched, denoising_start)))
    if sched.order == 2 and remaining % 2 == 0:
        remaining += 1  # as diffusers: a second-order scheduler must not start between its two halves
    return len(sched.timesteps) - remaining


def _check_strength(strength: float) -> None:
    if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise InvalidInputError(f"strength must be a number from 0 to 1, got {strength!r}")


def _check_mask_blur(mask_blur: float) -> None:
    if (
        isinstance(mask_blur, bool)
        or not isinstance(mask_blur, (int, float))
        or not math.isfinite(mask_blur)
        or mask_blur < 0
    ):
        raise InvalidInputError(f"mask_blur must be a number >= 0, got {mask_blur!r}")


def _require_a_step(sched: Scheduler, start: int, steps: int, strength: float) -> None:
    """Inpainting needs at least one denoising step: without one the masked area would be left as pure noise."""
    if start >= len(sched.timesteps):
        raise InvalidInputError(
            f"strength {strength!r} is too small: no denoising step would run with {steps} steps "
            f"(int({steps} * {strength!r}) = 0); raise strength or num_inference_steps"
        )


def _start_index(sched: Scheduler, steps: int, strength: float) -> int:
    """The timestep index img2img/inpaint start at: diffusers' get_timesteps (only int(steps * strength) run).

    len(sched.timesteps) means no step runs: img2img then returns the VAE round trip, inpaint refuses it
    (_require_a_step).
    """
    init_steps = min(int(steps * strength), steps)
    if init_steps == 0:
        return len(sched.timesteps)  # no step at all (PNDM's extra first timestep must not sneak one in)
    return (steps - init_steps) * sched.order


def _paste_back(images: list[Image.Image], original: np.ndarray, soft: np.ndarray) -> list[Image.Image]:
    """Blend each generated image over the original pixels: soft = 1 keeps the generated pixel."""
    keep = imageio.to_pil(original)[0]
    alpha = Image.fromarray((soft[0, 0] * 255).round().astype(np.uint8))
    return [Image.composite(image, keep, alpha) for image in images]
