"""The native JSON API's request bodies (``/v1/txt2img`` and friends) and how images travel in them.

Every option of the Python API's tasks is a field of the same name; images are base64 (PNG, JPEG,
WebP; a ``data:`` URL prefix is accepted). Unknown fields are refused by name. Nothing in a body can
name a file: models by their served name, LoRA adapters by their configured name, images as bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sdtrt.runtime.control import CONTROL_OPTIONS
from sdtrt.runtime.request import Request
from sdtrt.serve.errors import ApiError

MAX_INPUT_PIXELS = 4096 * 4096  # a decoded input image; beyond it (a decompression bomb) the request is refused


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerationBody(Body):
    """The options every task shares (sdtrt.runtime.request.Request), the model and the LoRA scales."""

    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    num_images: int = 1
    scheduler: str | None = None
    model: str | None = Field(default=None, description="a served model's name; may be left out when one is served")
    loras: dict[str, float] = Field(default_factory=dict, description="configured adapter name -> scale")

    def to_request(self) -> Request:
        """The shared options as the Request the Python API takes (a task without a size of its own has none)."""
        return Request(
            self.prompt,
            negative_prompt=self.negative_prompt,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            num_images=self.num_images,
            scheduler=self.scheduler,
            height=getattr(self, "height", None),
            width=getattr(self, "width", None),
        )

    def task_inputs(self) -> dict[str, Any]:
        """The task's own options (beyond the Request's), images decoded."""
        return {}


class SizedBody(GenerationBody):
    height: int | None = None
    width: int | None = None


class ControlledBody(SizedBody):
    """A task that takes ControlNets (runtime/control.py), with diffusers' names; images as base64."""

    controlnet: str | list[str] | None = Field(default=None, description="attached names; default: all of them")
    control_image: str | list[str] | None = Field(default=None, description="one base64 image per ControlNet")
    controlnet_conditioning_scale: float | list[float] | None = None
    control_guidance_start: float | list[float] | None = None
    control_guidance_end: float | list[float] | None = None
    guess_mode: bool | None = None

    def control_inputs(self) -> dict[str, Any]:
        """The ControlNet options given, control images decoded (the pipeline checks the rest)."""
        given = self.model_dump(include=set(CONTROL_OPTIONS), exclude_none=True)
        if isinstance(images := given.get("control_image"), str):
            given["control_image"] = decode_image(images, "control_image")
        elif images is not None:
            given["control_image"] = [decode_image(image, f"control_image[{i}]") for i, image in enumerate(images)]
        return given

    def task_inputs(self) -> dict[str, Any]:
        return self.control_inputs()


class Txt2ImgBody(ControlledBody):
    pass


class Img2ImgBody(ControlledBody):
    image: str = Field(description="base64 PNG/JPEG/WebP")
    strength: float = 0.8

    def task_inputs(self) -> dict[str, Any]:
        return {"image": decode_image(self.image, "image"), "strength": self.strength, **self.control_inputs()}


class InpaintBody(ControlledBody):
    image: str
    mask: str = Field(description="base64 image of the image's size: white = repaint")
    strength: float = 1.0
    mask_blur: float = 0.0

    def task_inputs(self) -> dict[str, Any]:
        image, mask = decode_image(self.image, "image"), decode_image(self.mask, "mask")
        own = {"image": image, "mask": mask, "strength": self.strength, "mask_blur": self.mask_blur}
        return own | self.control_inputs()


class OutpaintBody(GenerationBody):
    image: str
    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    overlap: int = 16
    mask_blur: float = 8.0
    strength: float = 1.0

    def task_inputs(self) -> dict[str, Any]:
        own = self.model_dump(include={"left", "right", "top", "bottom", "overlap", "mask_blur", "strength"})
        return {"image": decode_image(self.image, "image"), **own}


class UpscaleBody(GenerationBody):
    image: str
    noise_level: int = 20
    tile_size: int | None = None
    tile_overlap: int | None = None
    tiling: bool = True

    def task_inputs(self) -> dict[str, Any]:
        own = {"noise_level": self.noise_level, "tiling": self.tiling}
        tiles = {"tile_size": self.tile_size, "tile_overlap": self.tile_overlap}
        own.update({name: value for name, value in tiles.items() if value is not None})
        return {"image": decode_image(self.image, "image"), **own}


TASK_BODIES: dict[str, type[GenerationBody]] = {
    "txt2img": Txt2ImgBody,
    "img2img": Img2ImgBody,
    "inpaint": InpaintBody,
    "outpaint": OutpaintBody,
    "upscale": UpscaleBody,
}


def decode_image(data: str, what: str) -> Image.Image:
    """A base64 image (optionally a data: URL) as a loaded PIL image; one ApiError for anything else."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError("invalid_input", f"{what} must be a base64-encoded image") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise ApiError("invalid_input", f"{what} is {image.width}x{image.height}: above {MAX_INPUT_PIXELS} pixels")
        image.load()
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ApiError("invalid_input", f"{what} is not an image PIL can read: {exc}") from None
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64_png(image: Image.Image) -> str:
    return base64.b64encode(encode_png(image)).decode("ascii")
