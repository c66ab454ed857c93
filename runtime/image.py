"""Images in and out: validation, resizing to the model's size rules, masks, and tensors <-> PIL.

Images given as files or PIL images may be of any mode: greyscale and 16-bit ones become RGB, and
transparent ones (RGBA, LA, palettes with a transparent colour) are composited over white, as a viewer
shows them. Each conversion is logged: a warning where it drops something (transparency, bits), else
at info. NumPy arrays must be (H, W) or (H, W, 3).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from sdtrt.engine.errors import InvalidInputError

log = logging.getLogger(__name__)

ImageInput = Image.Image | np.ndarray | str | os.PathLike
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, 3, H, W) float in [-1, 1] -> RGB images, rounded as diffusers' image processor does."""
    pixels = np.clip(images.astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    pixels = (pixels.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)  # (B, H, W, 3)
    return [Image.fromarray(p) for p in pixels]


def _open(image: ImageInput, what: str) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened
        except (OSError, SyntaxError) as exc:
            raise InvalidInputError(f"cannot read {what} {path}: {exc}") from None
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        elif array.dtype.kind == "f":
            if not np.isfinite(array).all():
                raise InvalidInputError(f"{what} array holds NaN or inf: pass finite values in [0, 1]")
            array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
            raise InvalidInputError(
                f"{what} array must be (H, W) or (H, W, 3) of uint8, bool or floats in [0, 1]; "
                f"got {array.dtype} {array.shape}"
            )
        if array.size == 0:
            raise InvalidInputError(f"{what} is empty ({array.shape})")
        return Image.fromarray(array)
    if isinstance(image, Image.Image):
        return image
    raise InvalidInputError(f"{what} must be a PIL image, a NumPy array or a file path, not {type(image).__name__}")


def load_rgb(image: ImageInput, what: str = "image") -> Image.Image:
    """An RGB PIL image, converted from any other mode (see the module's doc); an empty image is an error."""
    pil = _open(image, what)
    if pil.width == 0 or pil.height == 0:
        raise InvalidInputError(f"{what} is empty ({pil.width}x{pil.height})")
    if pil.mode == "RGB" and "transparency" not in pil.info:
        return pil
    name = f"{what} {Path(image).name}" if isinstance(image, (str, os.PathLike)) else what
    try:
        if _has_alpha(pil):
            white = Image.new("RGBA", pil.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, pil.convert("RGBA")).convert("RGB")
            log.warning("%s is %s: its transparent pixels are composited over white", name, pil.mode)
            return rgb
        rgb = _eight_bit(pil).convert("RGB")
    except ValueError as exc:  # a mode Pillow has no conversion for
        raise InvalidInputError(f"{name} is {pil.mode}, which cannot be converted to RGB: {exc}") from None
    level = logging.WARNING if pil.mode in (*SIXTEEN_BIT_MODES, "I") else logging.INFO
    log.log(level, "%s is %s: converted to 8-bit RGB", name, pil.mode)
    return rgb


def load_mask(mask: ImageInput) -> Image.Image:
    """A mask as a greyscale ("L") PIL image: white (>= 0.5) marks what to repaint (16-bit masks scaled to 8 bits)."""
    pil = _open(mask, "mask")
    if pil.width == 0 or pil.height == 0:
        raise InvalidInputError(f"mask is empty ({pil.width}x{pil.height})")
    try:
        return _eight_bit(pil).convert("L")
    except ValueError as exc:
        raise InvalidInputError(f"mask is {pil.mode}, which cannot be converted to greyscale: {exc}") from None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (and 32-bit "I" holding values past 255) scaled to 8-bit "L"; other modes as they are."""
    if image.mode not in (*SIXTEEN_BIT_MODES, "I"):
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode in SIXTEEN_BIT_MODES or values.max(initial=0) > 255:
        values = values / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8))


def fit_size(
    image: Image.Image,
    height: int | None,
    width: int | None,
    multiple: int,
    area: int | None = None,
    max_side: int | None = None,
) -> tuple[int, int]:
    """The (height, width) an input image is resized to, in multiples of ``multiple``: as asked; one side left
    out follows the other at the image's aspect ratio; with neither, the image's own size, scaled down (aspect
    kept) to at most ``area`` pixels and ``max_side`` per side where given. Default sides are rounded down."""
    if image.height < multiple or image.width < multiple:
        raise InvalidInputError(
            f"image {image.width}x{image.height} is smaller than this model's size step of {multiple} pixels"
        )
    scale = 1.0  # of the image's own size, for the sides left out
    if height is None and width is None:
        scale = min(scale, math.sqrt(area / (image.height * image.width)) if area else scale)
        scale = min(scale, max_side / max(image.height, image.width) if max_side else scale)
    elif _positive(given := width if height is None else height):  # else left for check_size to name
        scale = given / (image.width if height is None else image.height)

    def default(side: int) -> int:
        return max(multiple, int(side * scale + 1e-6) // multiple * multiple)

    return default(image.height) if height is None else height, default(image.width) if width is None else width


def _positive(size: object) -> bool:
    return isinstance(size, (int, float)) and not isinstance(size, bool) and size > 0


def image_to_array(image: Image.Image, height: int, width: int, resample: str = "lanczos") -> np.ndarray:
    """RGB image -> (1, 3, height, width) float32 in [-1, 1], resized as diffusers' VaeImageProcessor does."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=_RESAMPLE[resample])
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return (2.0 * pixels - 1.0).transpose(2, 0, 1)[None]


def mask_to_array(mask: Image.Image, height: int, width: int) -> np.ndarray:
    """Mask -> (1, 1, height, width) float32 of 0 (keep) and 1 (repaint): resized, to grey, binarized at 0.5."""
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.Resampling.LANCZOS)
    grey = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return (grey >= 0.5).astype(np.float32)[None, None]


def soft_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """(1, 1, H, W) binary mask -> the same blurred with a Gaussian of ``radius`` pixels, for blending seams."""
    grey = Image.fromarray((mask[0, 0] * 255).astype(np.uint8))
    radius = min(radius, max(mask.shape[-2:]))  # wider than the image blurs no more (and 1e40 overflows PIL)
    blurred = np.asarray(grey.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0
    # keep every pixel the mask marks fully repainted: the blur only feathers into the kept side
    return np.maximum(blurred, mask[0, 0])[None, None]


_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}
