"""OpenAI's image API: ``POST /v1/images/generations`` (prompt, n, size, response_format b64_json).

``model`` is a served model's name (left out: the only one served); ``seed``, ``negative_prompt``,
``steps``, ``guidance_scale``, ``loras`` (configured adapter name -> scale), ``vae`` and ``cache_interval`` (the
per-image levers) are sdtrt's additions, which the OpenAI client sends as ``extra_body``. Fields OpenAI defines
that do not apply here (quality, style, user) are accepted and ignored; others are refused by name.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest

from sdtrt.runtime.request import Request
from sdtrt.serve.errors import ApiError
from sdtrt.serve.schemas import b64_png
from sdtrt.serve.server import Server

router = APIRouter(prefix="/v1/images", tags=["openai"])
SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


class ImagesGenerationsBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    n: int = Field(default=1, ge=1)
    size: str | None = Field(default=None, description="WIDTHxHEIGHT; default: the model's native size")
    response_format: Literal["b64_json"] = "b64_json"
    model: str | None = None
    quality: str | None = None  # OpenAI's; ignored
    style: str | None = None  # OpenAI's; ignored
    user: str | None = None  # OpenAI's; ignored
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    loras: dict[str, float] = Field(default_factory=dict, description="configured adapter name -> scale (extra_body)")
    vae: str = Field(default="full", description='"tiny": the export\'s tiny VAE (extra_body)')
    cache_interval: int = Field(default=1, description="step caching: the whole UNet every N-th step (extra_body)")


@router.post("/generations")
async def generations(body: ImagesGenerationsBody, http: HttpRequest) -> dict:
    server: Server = http.app.state.server
    width = height = None
    if body.size is not None:
        if not (match := SIZE.fullmatch(body.size)):
            raise ApiError("invalid_input", f"size must be WIDTHxHEIGHT, e.g. 512x512; got {body.size!r}")
        width, height = int(match[1]), int(match[2])
    request = Request(
        body.prompt,
        negative_prompt=body.negative_prompt,
        num_inference_steps=body.steps,
        guidance_scale=body.guidance_scale,
        height=height,
        width=width,
        seed=body.seed,
        num_images=body.n,
        vae=body.vae,
        cache_interval=body.cache_interval,
    )
    job = server.submit("txt2img", request, model=body.model, loras=body.loras)
    result = await server.wait(job, http)
    images = await run_in_threadpool(lambda: [b64_png(image) for image in result.images])
    return {"created": int(time.time()), "data": [{"b64_json": image} for image in images], "seed": result.seed}
