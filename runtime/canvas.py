"""Canvas geometry: overlapping tiles with feathered seams (upscaling) and outpainting canvases."""

from __future__ import annotations

import numpy as np


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: every tile - overlap pixels, the last one flush with the edge."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) tiles of at most ``tile`` pixels covering a height x width image, overlapping >= ``overlap``."""
    return [
        (y, x, min(tile, height), min(tile, width))
        for y in _starts(height, tile, overlap)
        for x in _starts(width, tile, overlap)
    ]


def feather(height: int, width: int, ramp: int, top: bool, left: bool, bottom: bool, right: bool) -> np.ndarray:
    """(1, 1, height, width) blending weights: 1 inside, linear ramps of ``ramp`` pixels on the flagged sides.

    The ramps never reach 0, so every pixel a neighbouring tile does not cover keeps a weight.
    """
    ramp = min(ramp, height // 2, width // 2)

    def axis(n: int, low: bool, high: bool) -> np.ndarray:
        weights = np.ones(n, dtype=np.float32)
        if ramp:
            rising = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp
            if low:
                weights[:ramp] = np.minimum(weights[:ramp], rising)
            if high:
                weights[-ramp:] = np.minimum(weights[-ramp:], rising[::-1])
        return weights

    return (axis(height, top, bottom)[:, None] * axis(width, left, right)[None, :])[None, None]


def outpaint_canvas(
    image: np.ndarray, left: int, right: int, top: int, bottom: int, overlap: int, multiple: int
) -> tuple[np.ndarray, np.ndarray]:
    """The canvas (H', W', 3) uint8 and mask (H', W') uint8 (255 = paint) for extending ``image`` outwards.

    New pixels repeat the nearest border pixel (a colour hint for the model); the canvas grows further on
    the bottom and right until both sides are multiples of ``multiple``. The mask covers every new pixel
    and ``overlap`` pixels of the original along each extended side, so the seam itself gets repainted.
    """
    height, width = image.shape[:2]
    bottom += -(height + top + bottom) % multiple
    right += -(width + left + right) % multiple
    canvas = np.pad(image, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.zeros(canvas.shape[:2], dtype=np.uint8)
    if top:
        mask[: top + overlap] = 255
    if bottom:
        mask[top + height - overlap :] = 255
    if left:
        mask[:, : left + overlap] = 255
    if right:
        mask[:, left + width - overlap :] = 255
    return canvas, mask
