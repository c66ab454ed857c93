"""The native JSON API's request bodies (``/v1/txt2img`` and friends) and how images travel in them.

Each body is made from its task's record (runtime/tasks): every option of the Python API's task is a field of
the same name, with the same default and help; images are base64 (PNG, JPEG,
WebP; a ``data:`` URL prefix is accepted). Unknown fields are refused by name. Nothing in a body can
name a file: models by their served name, LoRA adapters by their configured name, images as bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, ClassVar

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, create_model

from sdtrt.runtime.control import CONTROL_OPTIONS
from sdtrt.runtime.request import Request
from sdtrt.runtime.tasks import TASKS, Task
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
    vae: str = Field(default="full", description='"tiny": the export\'s tiny VAE (sdtrt add-tiny-vae)')
    cache_interval: int = Field(default=1, description="step caching: the whole UNet every N-th step, 1: off")
    cache_branch: int | None = Field(default=None, description="step caching's skip branch (default: the graphs')")
    cache_schedule: str = Field(default="uniform", description='where the full steps fall: "uniform", "nonuniform"')
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
            vae=self.vae,
            cache_interval=self.cache_interval,
            cache_branch=self.cache_branch,
            cache_schedule=self.cache_schedule,
            height=getattr(self, "height", None),
            width=getattr(self, "width", None),
        )

    def task_inputs(self) -> dict[str, Any]:
        """The task's own arguments (beyond the Request's) as given or defaulted, images decoded, and the
        ControlNet options given."""
        given = self.model_dump(exclude=set(GenerationBody.model_fields) | {"height", "width"})
        for name in self.image_fields:
            given[name] = decode_image(given[name], name)
        if isinstance(images := given.get("control_image"), str):
            given["control_image"] = decode_image(images, "control_image")
        elif images is not None:
            given["control_image"] = [decode_image(image, f"control_image[{i}]") for i, image in enumerate(images)]
        return {name: value for name, value in given.items() if name not in CONTROL_OPTIONS or value is not None}

    image_fields: ClassVar[tuple[str, ...]] = ()  # the task's input images (base64)


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


FIELD_TYPES = {"int": int, "float": float, "bool": bool}


def task_body(task: Task) -> type[GenerationBody]:
    """The native API's body of ``task``, made from its record: the shared options (its own steps and guidance as
    their defaults), a size where it takes one, ControlNets where it takes them, its input images as base64 and
    its options with their defaults and help (Python-only options are not fields)."""
    base = ControlledBody if task.controlnets else SizedBody if task.sized else GenerationBody
    fields: dict[str, Any] = {
        "num_inference_steps": (int | None, Field(default=task.steps, description="denoising steps")),
        "guidance_scale": (float | None, Field(default=task.guidance, description="classifier-free guidance scale")),
    }
    for argument in task.arguments:
        if argument.python_only:
            continue
        if argument.kind == "image":
            fields[argument.name] = (str, Field(description=f"{argument.help}: base64 PNG/JPEG/WebP"))
            continue
        kind = FIELD_TYPES[argument.kind]
        annotation = kind | None if argument.default is None else kind
        description = argument.help + (f" (default: {argument.default_help})" if argument.default_help else "")
        fields[argument.name] = (annotation, Field(default=argument.default, description=description))
    name = "".join(part.capitalize() for part in task.name.split("_")) + "Body"
    body = create_model(name, __base__=base, __doc__=f"{task.name}: {task.summary}.", **fields)
    body.image_fields = task.images
    return body


def task_bodies() -> dict[str, type[GenerationBody]]:
    """The body of every registered task, by task name."""
    return {name: task_body(task) for name, task in TASKS.items()}


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
