"""Pictures of a job's latents mid-generation, for progress routes: the tiny VAE's where the export has one,
else a cheap linear map of each latent pixel's channels to RGB.

The tiny VAE (``sdtrt add-tiny-vae``) decodes the latents at full resolution, with the runtime's own decode
(runtime/vae.py). It runs in the worker's thread, between two UNet calls of the job (a pipeline's sessions are
not safe to call from a route's thread), and only while a client watches the job: one that asked for its preview
within the last ``WATCH_S`` seconds. A route shows the latest preview decoded; before the first one, or after the
tiny VAE failed (logged; the generation goes on), the linear map's.

The linear map is fitted once per model, by least squares, on a finished generation's latents and its decoded
image (the server's warm-up): the VAE decoder runs once at start, never for such a preview.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdtrt.engine.manifest import Manifest
from sdtrt.runtime.image import to_pil
from sdtrt.runtime.runner import NetworkRunner
from sdtrt.runtime.vae import TINY_DECODER, decode_latents

log = logging.getLogger(__name__)

WATCH_S = 5.0  # a job is watched this long after a client last asked for its preview
TINY, LINEAR = "tiny_vae", "linear"  # where a preview came from


class LatentPreview:
    """latents (C, h, w) -> an RGB image of h x w: rgb = [latent, 1] @ weights, weights (C + 1, 3)."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights.astype(np.float32)

    @classmethod
    def fit(cls, latents: np.ndarray, image: Image.Image) -> LatentPreview:
        """The least-squares map from ``latents`` (C, h, w) to ``image`` averaged down to h x w, in [0, 1]."""
        channels, h, w = latents.shape
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
        fy, fx = pixels.shape[0] // h, pixels.shape[1] // w
        target = pixels[: h * fy, : w * fx].reshape(h, fy, w, fx, 3).mean(axis=(1, 3)).reshape(-1, 3)  # (h*w, 3)
        design = np.concatenate([latents.reshape(channels, -1).T, np.ones((h * w, 1), np.float32)], axis=1)
        weights, *_ = np.linalg.lstsq(design, target, rcond=None)
        return cls(weights)

    def render(self, latents: np.ndarray) -> Image.Image:
        """(C, h, w) float32 latents as an RGB image of h x w pixels."""
        channels, h, w = latents.shape
        flat = latents.reshape(channels, -1).T
        rgb = flat @ self.weights[:-1] + self.weights[-1]  # (h*w, 3)
        return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8).reshape(h, w, 3))


@dataclass(frozen=True)
class Preview:
    """A picture of the first image's latents as they entered the UNet after ``step`` steps, and its source."""

    image: Image.Image
    step: int
    source: str  # TINY or LINEAR


@dataclass
class JobPreview:
    """One job's preview state: written by the worker's thread, read by the routes' (each field in one store)."""

    latest: tuple[np.ndarray, int] | None = None  # the UNet's latest sample input (B or 2B, C', h, w), its step
    watched_until: float = 0.0  # time.monotonic() until which a client watches the job
    tiny: Preview | None = None  # the latest the tiny VAE decoded
    failed: bool = False  # the tiny VAE failed on this job: its previews are the linear map's


class Previewer:
    """How one model's jobs are previewed: by its tiny VAE where the export has one, else by ``linear``."""

    def __init__(
        self, manifest: Manifest, linear: LatentPreview | None, observe: Callable[[float], None] | None = None
    ) -> None:
        self.manifest = manifest
        self.linear = linear  # None: no warm-up image to fit it on
        self.tiny = TINY_DECODER in manifest.components
        self.observe = observe  # told the seconds of each tiny decode (the server's metric)

    @property
    def available(self) -> bool:
        return self.tiny or self.linear is not None

    def warm_up(self, runner: NetworkRunner, latents: np.ndarray) -> None:
        """Open the tiny decoder now, on ``latents`` (1, C, h, w), not on a watched job's first step; a failure is
        logged (the jobs' previews will fall back to the linear map)."""
        if not self.tiny:
            return
        try:
            decode_latents(runner, self.manifest, latents, "tiny")
        except Exception:
            log.warning("the tiny VAE failed at warm-up: previews will be the linear map's", exc_info=True)

    def on_sample(self, state: JobPreview, sample: np.ndarray, step: int, runner: NetworkRunner) -> None:
        """In the worker's thread, before a UNet call: keep its input, and decode it with the tiny VAE on ``runner``
        if a client watches the job. A failure is logged and never reaches the generation."""
        state.latest = (sample, step)
        if not self.tiny or state.failed or time.monotonic() > state.watched_until:
            return
        t0 = time.perf_counter()
        try:
            latents = np.ascontiguousarray(sample[:1, : self.manifest.latent_channels])  # the first image's
            image = to_pil(decode_latents(runner, self.manifest, latents, "tiny"))[0]
        except Exception:
            state.failed = True
            log.warning("the tiny VAE's preview failed: this job's previews are the linear map's", exc_info=True)
            return
        if self.observe is not None:
            self.observe(time.perf_counter() - t0)
        state.tiny = Preview(image, step, TINY)

    def show(self, state: JobPreview) -> Preview | None:
        """In a route's thread: the job's latest preview (None before its first UNet call, or where there is none
        to show); the job counts as watched for the next ``WATCH_S`` seconds."""
        state.watched_until = time.monotonic() + WATCH_S
        if (tiny := state.tiny) is not None and not state.failed:
            return tiny
        latest = state.latest
        if latest is None or self.linear is None:
            return None
        sample, step = latest
        return Preview(self.linear.render(sample[0, : self.manifest.latent_channels]), step, LINEAR)
