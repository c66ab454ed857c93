"""A cheap picture of latents mid-generation: a linear map of each latent pixel's channels to RGB.

The map is fitted once per model, by least squares, on a finished generation's latents and its decoded
image (the server's warm-up): the VAE decoder runs once at start, never for a preview.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


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
