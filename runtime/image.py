"""Images in and out: validation, resizing to the model's size rules, masks, and tensors <-> PIL."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from sdtrt.engine.errors import InvalidInputError

ImageInput = Image.Image | np.ndarray | str | os.PathLike


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
    """An RGB PIL image; any other mode (RGBA, L, P, ...) or an empty image is an error."""
    pil = _open(image, what)
    if pil.width == 0 or pil.height == 0:
        raise InvalidInputError(f"{what} is empty ({pil.width}x{pil.height})")
    if pil.mode != "RGB":
        raise InvalidInputError(f"{what} has mode {pil.mode}, not RGB: convert it first, e.g. image.convert('RGB')")
    return pil


def load_mask(mask: ImageInput) -> Image.Image:
    """A mask as a PIL image of any mode: white (>= 0.5) marks what to repaint."""
    pil = _open(mask, "mask")
    if pil.width == 0 or pil.height == 0:
        raise InvalidInputError(f"mask is empty ({pil.width}x{pil.height})")
    return pil


def fit_size(image: Image.Image, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    """The (height, width) an input image is resized to: as asked, or its own size rounded down to ``multiple``."""
    if height is None:
        height = image.height // multiple * multiple
    if width is None:
        width = image.width // multiple * multiple
    if height < multiple or width < multiple:
        raise InvalidInputError(
            f"image {image.width}x{image.height} is smaller than this model's size step of {multiple} pixels"
        )
    return height, width


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
    blurred = np.asarray(grey.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0
    # keep every pixel the mask marks fully repainted: the blur only feathers into the kept side
    return np.maximum(blurred, mask[0, 0])[None, None]


_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC}
