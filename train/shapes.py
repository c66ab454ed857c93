"""A synthetic captioned data set: one coloured geometric shape on a coloured background.

Everything is drawn from a seed, so the same seed gives the same images and captions. A caption
names the shape's colour and kind and the background colour, and optionally its size and place:
"a large red circle on a blue background, top left". The same palette classifies generated
images in the semantic tests (``dominant_colours``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64  # pixels per side
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: anti-aliased edges

# Colours far apart in RGB, so a blurry edge between two of them is still closest to one of the two.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 210, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.3, "large": 0.5}  # the shape's extent (diameter, side, base) as a share of the image side
POSITIONS = {  # the shape's centre as (x, y) shares of the image side
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
JITTER = 0.04  # uniform +- jitter of the centre, as a share of the image side


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str
    cx: float  # centre, shares of the image side
    cy: float

    def caption(self, with_size: bool = True, with_position: bool = True) -> str:
        size = f"{self.size} " if with_size else ""
        position = f", {self.position}" if with_position else ""
        return f"a {size}{self.colour} {self.shape} on a {self.background} background{position}"


def sample_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(list(PALETTE), size=2, replace=False)
    position = str(rng.choice(list(POSITIONS)))
    x, y = POSITIONS[position]
    dx, dy = rng.uniform(-JITTER, JITTER, size=2)
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=str(colour),
        background=str(background),
        size=str(rng.choice(list(SIZES))),
        position=position,
        cx=float(x + dx),
        cy=float(y + dy),
    )


def sample_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The scene's caption, with its size and its place each left out half the time."""
    return scene.caption(with_size=bool(rng.random() < 0.5), with_position=bool(rng.random() < 0.5))


def shape_mask(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) float32 coverage in [0, 1] of the scene's shape."""
    n = size * SUPERSAMPLE
    # pixel centres in shares of the image side, (n, n) each
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    x, y = (x + 0.5) / n, (y + 0.5) / n
    extent = SIZES[scene.size]
    dx, dy = x - scene.cx, y - scene.cy
    if scene.shape == "circle":
        inside = dx**2 + dy**2 <= (extent / 2) ** 2
    elif scene.shape == "square":
        half = extent * 0.45  # a little smaller than the circle's box: about the same area to the eye
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif scene.shape == "triangle":  # pointing up, base and height = extent, centred on its box
        half = extent / 2
        rel = (dy + half) / extent  # 0 at the apex, 1 at the base
        inside = (rel >= 0) & (rel <= 1) & (np.abs(dx) <= half * rel)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return inside.astype(np.float32).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8 RGB image of the scene."""
    cover = shape_mask(scene, size)[..., None]
    fg = np.asarray(PALETTE[scene.colour], np.float32)
    bg = np.asarray(PALETTE[scene.background], np.float32)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


def make_dataset(count: int, seed: int) -> tuple[list[Scene], np.ndarray]:
    """``count`` scenes and their images, (count, size, size, 3) uint8, from ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(count)]
    return scenes, np.stack([render(s) for s in scenes])


def nearest_colours(image: np.ndarray) -> np.ndarray:
    """(H, W) index into PALETTE of the closest palette colour to each pixel of an (H, W, 3) image."""
    palette = np.asarray(list(PALETTE.values()), np.float32)  # (K, 3)
    distance = ((image[:, :, None, :].astype(np.float32) - palette) ** 2).sum(-1)  # (H, W, K)
    return distance.argmin(-1)


def dominant_colours(image: np.ndarray) -> tuple[str, str]:
    """(shape colour, background colour) of an (H, W, 3) uint8 image, by pixel statistics.

    The background is the commonest palette colour on the image's border; the shape is the
    commonest other colour within a disc around the centre of mass of the non-background pixels
    (so stray pixels and blended edges count little). A picture with no shape gives its background
    twice.
    """
    names = list(PALETTE)
    labels = nearest_colours(image)
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background = Counter(border.tolist()).most_common(1)[0][0]
    ys, xs = np.nonzero(labels != background)
    if len(xs) == 0:
        return names[background], names[background]
    cy, cx = ys.mean(), xs.mean()
    radius = max(2.0, 0.7 * np.sqrt(len(xs) / np.pi))  # 0.7 of the radius of a disc of the shape's area
    near = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    chosen = labels[ys[near], xs[near]] if near.any() else labels[ys, xs]
    shape = Counter(chosen.tolist()).most_common(1)[0][0]
    return names[shape], names[background]
