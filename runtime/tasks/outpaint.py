"""outpaint: extend an image beyond its borders and paint the new area (an inpaint of a grown canvas)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sdtrt.engine.errors import InvalidInputError
from sdtrt.runtime import canvas
from sdtrt.runtime import image as image_ops
from sdtrt.runtime.generation import Generation, GenerationResult
from sdtrt.runtime.tasks.checks import default_size
from sdtrt.runtime.tasks.inpaint import STRENGTH_HELP, repaint
from sdtrt.runtime.tasks.record import Task, image_input, option

SIDES = ("left", "right", "top", "bottom")


@dataclass(frozen=True)
class OutpaintOptions:
    image: image_ops.ImageInput = image_input("the input RGB image")
    left: int = option(0, "pixels to add on the left", low=0)
    right: int = option(0, "pixels to add on the right", low=0)
    top: int = option(0, "pixels to add on the top", low=0)
    bottom: int = option(0, "pixels to add on the bottom", low=0)
    overlap: int = option(16, "pixels of the old image repainted at the seam", low=0)
    mask_blur: float = option(8.0, "seam feathering in pixels", low=0.0)
    strength: float = option(1.0, STRENGTH_HELP, low=0.0, high=1.0)


def outpaint(gen: Generation, options: OutpaintOptions) -> GenerationResult:
    source = image_ops.load_rgb(options.image)
    m = gen.manifest
    limit = min(m.default_height, m.default_width) // 2
    left, right, top, bottom = (getattr(options, side) for side in SIDES)
    for side in SIDES:
        if (pixels := getattr(options, side)) > limit:
            raise InvalidInputError(
                f"{side}={pixels}: one outpaint pass extends a side by at most {limit} pixels "
                "(half the model's native size); outpaint the result again to go further"
            )
    if not any((left, right, top, bottom)):
        raise InvalidInputError("outpaint needs an extension > 0 on at least one side (left/right/top/bottom)")
    overlap, multiple = options.overlap, m.size_multiple
    for side, size, low, high in (("height", source.height, top, bottom), ("width", source.width, left, right)):
        # the canvas also grows (bottom/right) to the size multiple: that side's mask takes the overlap too
        if (low or high or (size + low + high) % multiple) and overlap > size:
            raise InvalidInputError(
                f"overlap={overlap} is larger than the image {side} ({size} pixels) the canvas extends: "
                f"pass an overlap of at most {size}"
            )
    painted, mask = canvas.outpaint_canvas(np.asarray(source), left, right, top, bottom, overlap, multiple)
    painted_image = Image.fromarray(painted)
    r = gen.request  # the canvas is drawn at its own size (the ceiling permitting), or as asked
    own = r.height is None and r.width is None
    size = (painted_image.height, painted_image.width) if own else default_size(gen, painted_image)
    return repaint(gen, painted_image, Image.fromarray(mask), options.strength, options.mask_blur, size)


TASK = Task(
    name="outpaint",
    run=outpaint,
    options=OutpaintOptions,
    summary="extend an image beyond its borders",
    doc="""Extend ``image`` by ``left``, ``right``, ``top`` and ``bottom`` pixels and paint the new area.

The canvas is the image with its border pixels stretched outwards, grown on the right and
bottom to the model's size multiple; the mask covers the new area plus ``overlap`` pixels of
the old one, and the result is blended back over the original through a mask feathered by
``mask_blur``. One pass extends each side by at most half the model's native size; call again
on the result for more. ``strength`` is inpaint's.""",
    steps=50,
    size_help="the grown canvas's own size",
    batchable=True,
    batch_options=(*SIDES, "overlap", "mask_blur", "strength"),
)
