"""Conversions between network image tensors and PIL images."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, 3, H, W) float in [-1, 1] -> RGB images, rounded as diffusers' image processor does."""
    pixels = np.clip(images.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    pixels = (pixels.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)  # (B, H, W, 3)
    return [Image.fromarray(p) for p in pixels]
