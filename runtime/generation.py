"""One generation call: its checked request, noise source and timings, the denoising loop, the VAE
halves, and the result.

Randomness comes from one NumPy Generator per call (``seed``, or the caller's ``rng``: any object
with NumPy's ``standard_normal(size, dtype)``). Draws follow diffusers' order — VAE latent samples,
initial noise, then each stochastic step — so a seed means the same image on every backend, and a
generator that replays torch's draws reproduces diffusers exactly (the parity tests do this).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Manifest
from sdtrt.runtime import image as image_ops
from sdtrt.runtime.conditioning import Conditioner
from sdtrt.runtime.request import Limits
from sdtrt.runtime.runner import NetworkRunner
from sdtrt.runtime.schedulers import Scheduler, make_scheduler
from sdtrt.runtime.sessions import Sessions
from sdtrt.runtime.step_cache import begin_step_cache
from sdtrt.runtime.vae import TINY_ENCODER, decode_latents

if TYPE_CHECKING:
    from sdtrt.runtime.plan import Plan  # the plan imports the tasks, which import this module

ProgressCallback = Callable[[int, int], None]  # (steps done, steps in all)
StepHook = Callable[[int, np.ndarray], np.ndarray]  # (step index, latents) -> latents, after each step


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


class Generation:
    """The state of one call shared by every task: plan, model, noise source, timings, progress."""

    def __init__(
        self,
        sessions: Sessions,
        conditioner: Conditioner,
        plan: Plan,
        rng: NormalSource | None,
        progress: ProgressCallback | None,
        limits: Limits,
        runner: NetworkRunner | None = None,
    ) -> None:
        self.start = time.perf_counter()
        self.plan = plan
        self.control = plan.control  # checked ControlNet options (runtime/control.py), or None
        self.cfg = plan.cfg
        self.sessions = sessions  # the model's files and sessions
        self.runner: NetworkRunner = sessions if runner is None else runner  # what runs every network call
        self.conditioner = conditioner
        self.manifest: Manifest = sessions.artifact.manifest
        self.request = plan.request  # checked: every default filled in
        request = self.request
        self.limits = limits  # the request was checked against them; sizes found later (an image's) are too
        if progress is not None and not callable(progress):
            raise InvalidInputError(f"progress must be a callable progress(done, total), got {progress!r}")
        self.progress = progress
        self.timings: dict[str, float] = {}
        seed = request.seed
        if rng is None:
            if seed is None:
                seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0])
            rng = np.random.default_rng(seed)
        elif seed is not None:
            raise InvalidInputError("pass a seed or an rng, not both")
        elif not callable(getattr(rng, "standard_normal", None)):
            raise InvalidInputError(
                f"rng must have NumPy's standard_normal(size, dtype), as numpy.random.default_rng() does; "
                f"got {type(rng).__name__}"
            )
        self.rng, self.seed = rng, seed

    @property
    def batch(self) -> int:
        return len(self.request.prompts) * self.request.num_images

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.manifest.vae_scale_factor
        return self.batch, self.manifest.latent_channels, height // f, width // f

    def normal(self, shape: tuple[int, ...]) -> np.ndarray:
        """Standard normal float32 noise of ``shape`` from the seed or the caller's rng (checked: a bad rng is
        one clear error, not a broken image)."""
        try:
            noise = np.asarray(self.rng.standard_normal(shape, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"rng.standard_normal({shape}, dtype=float32) failed: {exc}") from None
        problem = None
        if noise.shape != tuple(shape) or noise.dtype.kind != "f":
            problem = f"returned {noise.dtype} {noise.shape}"
        elif not np.isfinite(noise).all():
            problem = "returned NaN or inf"
        if problem:
            raise InvalidInputError(
                f"rng.standard_normal({shape}, dtype=float32) {problem}: it must return finite floats of that shape"
            )
        return noise.astype(np.float32, copy=False)

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def scheduler(self) -> Scheduler:
        """The request's scheduler (default: the model's own), configured from the model and set to its steps."""
        name = self.request.scheduler
        if name == "lcm" and not self.conditioner.guidance_embedded:
            raise InvalidInputError(
                "scheduler 'lcm' needs an LCM-distilled model, whose UNet takes the guidance scale as its "
                "timestep_cond input; this model's UNet has none: pick another scheduler"
            )
        sched = make_scheduler(name, self.manifest.scheduler)
        sched.set_timesteps(self.request.num_inference_steps)
        return sched

    def conditioning(self, height: int, width: int) -> dict[str, np.ndarray]:
        """The UNet's conditioning inputs for this request (Conditioner.unet_feeds)."""
        t0 = time.perf_counter()
        r = self.request
        feeds = self.conditioner.unet_feeds(
            self.runner, r.prompts, r.negative_prompts, r.num_images, r.guidance_scale, self.cfg, height, width
        )
        self.add_time("text_encoder", time.perf_counter() - t0)
        return feeds

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) in [-1, 1] -> scaled latents (N, C, H/8, W/8), sampled from the VAE's posterior."""
        t0 = time.perf_counter()
        if self.request.vae == "tiny":  # the UNet's latents, exactly: no posterior to sample (as diffusers)
            latents = self.runner.run(TINY_ENCODER, image=pixels)
        else:
            moments = self.runner.run("vae_encoder", image=pixels)  # (N, 2C, h, w): mean and log-variance
            mean, logvar = np.split(moments, 2, axis=1)
            std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
            latents = (mean + std * self.normal(mean.shape)) * np.float32(self.manifest.vae_scaling_factor)
        self.add_time("vae_encode", time.perf_counter() - t0)
        return latents.astype(np.float32)

    def denoise(
        self,
        sched: Scheduler,
        start: int,
        latents: np.ndarray,
        feeds: dict[str, np.ndarray],
        condition: np.ndarray | None = None,
        after_step: StepHook | None = None,
        stop: int | None = None,
    ) -> np.ndarray:
        """The loop over timestep indices [start, stop): UNet (+ CFG), scheduler step, optional per-step hook.

        ``feeds`` are the UNet's conditioning inputs (see conditioning); ``condition`` (B, c, h, w) is
        concatenated to the scaled latents on channels (inpainting mask and masked latents, or the
        upscaler's low-res image).
        """
        stop = len(sched.timesteps) if stop is None else stop
        guidance = np.float32(self.request.guidance_scale)
        unet_seconds = 0.0
        t0 = time.perf_counter()
        if condition is not None and self.cfg:
            condition = np.concatenate([condition, condition])
        control = self.control
        if control is not None:  # its window counts the steps this run takes, as diffusers' controlnet_keep
            f = self.manifest.vae_scale_factor
            height, width = (f * n for n in latents.shape[2:])
            control.begin(self.runner, len(sched.timesteps) - start, len(latents), self.cfg, height, width)
            control_seconds = control.seconds
        r = self.request
        cache = begin_step_cache(self.runner, stop - start, r.cache_interval, r.cache_schedule)  # None: off
        for i in range(start, stop):
            model_input = np.concatenate([latents, latents]) if self.cfg else latents
            model_input = sched.scale_model_input(model_input, i)  # (2B or B, C, h, w) float32
            timestep = np.full(model_input.shape[0], sched.timesteps[i], dtype=np.float32)
            residuals = {} if control is None else control.residuals(i - start, model_input, timestep, feeds)
            if condition is not None:
                model_input = np.concatenate([model_input, condition], axis=1)
            u0 = time.perf_counter()
            unet = "unet_controlnet" if residuals else "unet"  # the UNet that takes ControlNet residuals
            if cache is not None:  # DeepCache: the whole UNet on full steps, its shallow part between
                noise_pred = cache.run(i - start, {"sample": model_input, "timestep": timestep, **feeds})
            else:
                noise_pred = self.runner.run(unet, sample=model_input, timestep=timestep, **feeds, **residuals)
            unet_seconds += time.perf_counter() - u0
            if self.cfg:
                uncond_pred, text_pred = np.split(noise_pred, 2)
                noise_pred = uncond_pred + guidance * (text_pred - uncond_pred)
            noise = self.normal(latents.shape) if sched.needs_noise(i) else None
            latents = sched.step(noise_pred, i, latents, noise=noise)
            if after_step is not None:
                latents = after_step(i, latents)
            if self.progress is not None:
                self.progress(i - start + 1, stop - start)
        self.add_time("unet", unet_seconds)
        other_seconds = 0.0
        if control is not None:
            other_seconds = control.seconds - control_seconds
            self.add_time("controlnet", other_seconds)
        self.add_time("scheduler", time.perf_counter() - t0 - unet_seconds - other_seconds)
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, h, w) latents -> (B, 3, H, W) float32 image in [-1, 1]."""
        t0 = time.perf_counter()
        image = decode_latents(self.runner, self.manifest, latents, self.request.vae)
        self.add_time("vae_decode", time.perf_counter() - t0)
        return image

    def finish(
        self, sched: Scheduler, latents: np.ndarray, images: list[Image.Image] | None = None
    ) -> GenerationResult:
        """The result: ``images``, by default the decoded latents (pass [] to skip the VAE)."""
        if images is None:
            images = image_ops.to_pil(self.decode(latents))
        self.timings["total"] = time.perf_counter() - self.start
        backend = self.sessions.artifact.backend.kind
        return GenerationResult(images, latents, self.seed, self.timings, backend, sched.name)
