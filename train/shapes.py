"""A synthetic captioned data set: one coloured geometric shape on a coloured background.

Everything is drawn from a seed, so the same seed gives the same images and captions. A caption
names the shape's colour and kind and the background colour, and optionally its size and place:
"a large red circle on a blue background, top left". The same palette classifies generated
images in the semantic tests: ``dominant_colours``, ``shape_kind`` and ``shape_position`` read a
picture's colours, kind and place back.

A scene's semantic map (``semantic_map``, the tiny ControlNet's control image) is an image of the
same size, black except for the shape's region, painted in its kind's colour (``MAP_COLOURS``):
circle red (255, 0, 0), square green (0, 255, 0), triangle blue (0, 0, 255).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

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
# the semantic map's colour of each kind of shape; the map is black (0, 0, 0) elsewhere
MAP_COLOURS: dict[str, tuple[int, int, int]] = {"circle": (255, 0, 0), "square": (0, 255, 0), "triangle": (0, 0, 255)}
# the share of its bounding box a shape's region fills: circle pi/4, square 1, triangle 1/2; the thresholds between
FILL_THRESHOLDS = (("triangle", 0.64), ("circle", 0.9), ("square", float("inf")))


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


def sample_free_scene(rng: np.random.Generator) -> Scene:
    """A scene whose centre lies anywhere in the middle half of the image, not only at the five places.

    Its ``position`` is the named place nearest to the centre (the semantic maps' scenes: the map says
    where the shape is, the caption need not).
    """
    scene = sample_scene(rng)
    cx, cy = rng.uniform(0.25, 0.75, size=2)
    return replace(scene, cx=float(cx), cy=float(cy), position=nearest_position(float(cx), float(cy)))


def nearest_position(x: float, y: float) -> str:
    """The name of the place in POSITIONS nearest to (x, y), shares of the image side."""
    return min(POSITIONS, key=lambda name: (POSITIONS[name][0] - x) ** 2 + (POSITIONS[name][1] - y) ** 2)


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


def semantic_map(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8: pixels half covered by the shape or more in its kind's MAP_COLOURS, black elsewhere."""
    inside = shape_mask(scene, size)[..., None] >= 0.5
    return (inside * np.asarray(MAP_COLOURS[scene.shape], np.uint8)).astype(np.uint8)


def read_map(image: np.ndarray) -> tuple[str | None, np.ndarray]:
    """(kind, region) of an (H, W, 3) semantic map: the kind whose MAP_COLOURS fills most of it, (H, W) bool.

    A pixel is in the region when it is nearer to a map colour than to black; a map without one gives (None, region).
    """
    colours = np.asarray([(0, 0, 0), *MAP_COLOURS.values()], np.float32)  # (1 + kinds, 3)
    labels = ((image[:, :, None, :3].astype(np.float32) - colours) ** 2).sum(-1).argmin(-1)  # (H, W); 0 = black
    counts = np.bincount(labels.ravel(), minlength=len(colours))[1:]
    return (list(MAP_COLOURS)[counts.argmax()] if counts.any() else None), labels > 0


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


def _background(labels: np.ndarray) -> int:
    """The PALETTE index commonest on the border of an (H, W) map of nearest_colours."""
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    return Counter(border.tolist()).most_common(1)[0][0]


def dominant_colours(image: np.ndarray) -> tuple[str, str]:
    """(shape colour, background colour) of an (H, W, 3) uint8 image, by pixel statistics.

    The background is the commonest palette colour on the image's border; the shape is the
    commonest other colour within a disc around the centre of mass of the non-background pixels
    (so stray pixels and blended edges count little). A picture with no shape gives its background
    twice.
    """
    names = list(PALETTE)
    labels = nearest_colours(image)
    background = _background(labels)
    ys, xs = np.nonzero(labels != background)
    if len(xs) == 0:
        return names[background], names[background]
    cy, cx = ys.mean(), xs.mean()
    radius = max(2.0, 0.7 * np.sqrt(len(xs) / np.pi))  # 0.7 of the radius of a disc of the shape's area
    near = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    chosen = labels[ys[near], xs[near]] if near.any() else labels[ys, xs]
    shape = Counter(chosen.tolist()).most_common(1)[0][0]
    return names[shape], names[background]


def shape_region(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: the largest 8-connected patch of pixels that are not the background's colour.

    The background is as in dominant_colours; stray specks elsewhere are not part of the shape.
    """
    labels = nearest_colours(image)
    patches, count = ndimage.label(labels != _background(labels), structure=np.ones((3, 3)))
    if count == 0:
        return np.zeros(labels.shape, bool)
    sizes = np.bincount(patches.ravel())[1:]  # pixels per patch, 1..count
    return patches == 1 + sizes.argmax()


def shape_centroid(image: np.ndarray) -> tuple[float, float] | None:
    """(x, y) in pixels of the centre of the shape's region in an (H, W, 3) image; None where there is no shape."""
    ys, xs = np.nonzero(shape_region(image))
    return (float(xs.mean() + 0.5), float(ys.mean() + 0.5)) if len(xs) else None


def shape_position(image: np.ndarray) -> str | None:
    """The place in POSITIONS nearest to the shape's centroid in an (H, W, 3) image; None where there is no shape."""
    centroid = shape_centroid(image)
    if centroid is None:
        return None
    return nearest_position(centroid[0] / image.shape[1], centroid[1] / image.shape[0])


def shape_kind(image: np.ndarray) -> str | None:
    """ "circle", "square" or "triangle": the share of its bounding box the shape's region fills (FILL_THRESHOLDS).

    None where there is no shape.
    """
    region = shape_region(image)
    ys, xs = np.nonzero(region)
    if len(xs) == 0:
        return None
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    return next(kind for kind, below in FILL_THRESHOLDS if fill < below)
