"""Text-to-image over an sdtrt artifact folder: tokenizer -> text encoder -> denoising loop -> VAE decoder.

The denoising loop runs in NumPy; the networks run in sessions of whichever backend was chosen
(sdtrt.engine). Seeds draw the initial latents from NumPy's RNG, so a seed means the same image on
every backend.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sdtrt.engine.backends import BackendChoice, choose_backend, load_session
from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Manifest, load_manifest
from sdtrt.engine.session import Session
from sdtrt.runtime.image import to_pil
from sdtrt.runtime.schedulers import make_scheduler
from sdtrt.runtime.tokenizer import CLIPTokenizer

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (steps done, steps in all)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: np.ndarray  # (B, C, H/8, W/8) float32: the denoised latents, before the VAE
    seed: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage; see Pipeline.txt2img
    backend: str = ""
    scheduler: str = ""


class Pipeline:
    """A loaded artifact folder. ``Pipeline.load(dir)`` then ``pipe.txt2img("a prompt")``."""

    def __init__(self, folder: Path, manifest: Manifest, backend: BackendChoice) -> None:
        self.folder = folder
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = CLIPTokenizer.from_dir(folder / manifest.tokenizer)
        self._sessions: dict[str, Session] = {}

    @classmethod
    def load(cls, folder: str | os.PathLike[str], backend: str = "auto") -> Pipeline:
        """Open an artifact folder written by ``sdtrt export``; ``backend`` is "auto" or a name in BACKENDS."""
        folder = Path(folder)
        manifest = load_manifest(folder)
        pipe = cls(folder, manifest, choose_backend(backend))
        for component in ("text_encoder", "unet", "vae_decoder"):
            pipe.session(component)
        return pipe

    def session(self, component: str) -> Session:
        """The session of ``component``, opened on first use."""
        if component not in self._sessions:
            self._sessions[component] = load_session(self.backend, self.folder, self.manifest, component)
        return self._sessions[component]

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, component: str, **feeds: np.ndarray) -> np.ndarray:
        """Run a one-output network, casting float inputs to its dtype and the output to float32."""
        session = self.session(component)
        cast = {name: array.astype(session.inputs[name].dtype, copy=False) for name, array in feeds.items()}
        (output,) = session.run(cast).values()
        return output.astype(np.float32, copy=False)

    def encode_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """(len(prompts), 77, D) float32 text embeddings."""
        return self._run("text_encoder", input_ids=self.tokenizer(list(prompts)))

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
    ) -> GenerationResult:
        """Generate ``num_images`` images per prompt.

        ``scheduler`` is a name from sdtrt.runtime.schedulers.SCHEDULERS (default: the model's own);
        ``guidance_scale`` > 1 turns on classifier-free guidance with ``negative_prompt`` (default "");
        ``latents`` (B, C, H/8, W/8) replaces the seeded initial noise. Timings in the result, in
        seconds: text_encoder, unet (all steps), scheduler (the NumPy loop outside the UNet),
        vae_decode and total.
        """
        start = time.perf_counter()
        m = self.manifest
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = _negative_prompts(negative_prompt, len(prompts))
        height = m.default_height if height is None else height
        width = m.default_width if width is None else width
        _check_request(m, prompts, num_inference_steps, guidance_scale, height, width, num_images, seed)
        sched = make_scheduler(scheduler, m.scheduler)
        sched.set_timesteps(num_inference_steps)
        cfg = guidance_scale > 1.0  # diffusers' rule: guidance 1 (or less) is the plain conditional model

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        # (B, 77, D): each prompt repeated num_images times, as diffusers' num_images_per_prompt
        embeddings = np.repeat(self.encode_prompts(prompts), num_images, axis=0)
        if cfg:
            uncond = np.repeat(self.encode_prompts(negatives), num_images, axis=0)
            embeddings = np.concatenate([uncond, embeddings])  # (2B, 77, D): unconditional half first
        timings["text_encoder"] = time.perf_counter() - t0

        batch = len(prompts) * num_images
        shape = (batch, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        rng = np.random.default_rng(seed)
        if latents is None:
            latents = rng.standard_normal(shape, dtype=np.float32)
        elif latents.shape != shape:
            raise InvalidInputError(f"latents have shape {latents.shape}, expected {shape}")
        latents = latents.astype(np.float32) * np.float32(sched.init_noise_sigma)  # (B, C, H/8, W/8) float32

        unet_seconds = 0.0
        t0 = time.perf_counter()
        for i, t in enumerate(sched.timesteps):
            model_input = np.concatenate([latents, latents]) if cfg else latents
            model_input = sched.scale_model_input(model_input, i)
            timestep = np.full(model_input.shape[0], t, dtype=np.float32)
            u0 = time.perf_counter()
            noise_pred = self._run("unet", sample=model_input, timestep=timestep, encoder_hidden_states=embeddings)
            unet_seconds += time.perf_counter() - u0
            if cfg:
                uncond_pred, text_pred = np.split(noise_pred, 2)
                noise_pred = uncond_pred + np.float32(guidance_scale) * (text_pred - uncond_pred)
            noise = rng.standard_normal(latents.shape, dtype=np.float32) if sched.stochastic else None
            latents = sched.step(noise_pred, i, latents, noise=noise)
            if progress is not None:
                progress(i + 1, len(sched.timesteps))
        timings["unet"] = unet_seconds
        timings["scheduler"] = time.perf_counter() - t0 - unet_seconds

        t0 = time.perf_counter()
        image = self._run("vae_decoder", latent=latents / np.float32(m.vae_scaling_factor))
        images = to_pil(image)
        timings["vae_decode"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        return GenerationResult(images, latents, seed, timings, self.backend.kind, sched.name)


def _negative_prompts(negative_prompt: str | Sequence[str] | None, count: int) -> list[str]:
    if negative_prompt is None:
        return [""] * count
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = list(negative_prompt)
    if len(negatives) != count:
        raise InvalidInputError(f"{len(negatives)} negative prompts for {count} prompts: give one per prompt")
    return negatives


def _check_request(
    m: Manifest,
    prompts: list[str],
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    num_images: int,
    seed: int | None,
) -> None:
    """One clear error for a request the model cannot serve."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidInputError("prompt must be a string or a non-empty list of strings")
    if not isinstance(steps, int) or steps < 1:
        raise InvalidInputError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InvalidInputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise InvalidInputError(f"num_images must be an integer >= 1, got {num_images!r}")
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise InvalidInputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or size <= 0:
            raise InvalidInputError(f"{name} must be a positive integer, got {size!r}")
        if size % m.vae_scale_factor:
            raise InvalidInputError(f"{name} {size} is not divisible by {m.vae_scale_factor}")
        if size % m.size_multiple:
            raise InvalidInputError(
                f"{name} {size} must be a multiple of {m.size_multiple} for this model "
                f"(its UNet down-samples the {m.vae_scale_factor}x latents further); "
                f"try {size // m.size_multiple * m.size_multiple or m.size_multiple}"
            )
