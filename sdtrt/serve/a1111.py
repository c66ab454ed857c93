"""Automatic1111's web UI API: ``POST /sdapi/v1/txt2img`` and ``/sdapi/v1/img2img`` (an img2img with a ``mask``
inpaints), ``GET /sdapi/v1/progress`` (progress, ETA and a preview of the current latents), and the lists
``/sdapi/v1/sd-models`` and ``/sdapi/v1/samplers``.

Its clients send many fields of the web UI's own (restore_faces, tiling, ...): those are ignored, as are
sizes and steps left at 0. A size or step count left out is the model's and the task's default, as in
the Python API. The model is ``override_settings.sd_model_checkpoint`` (a served model's name).
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest

from sdtrt.runtime.generation import GenerationResult
from sdtrt.runtime.request import Request
from sdtrt.serve.errors import ApiError
from sdtrt.serve.schemas import b64_png, decode_image
from sdtrt.serve.server import Server

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

# the web UI's sampler names -> sdtrt's schedulers (sdtrt's own names are accepted too)
SAMPLERS = {
    "Euler a": "euler_a",
    "Euler": "euler",
    "LMS": "lms",
    "DDIM": "ddim",
    "PLMS": "pndm",
    "PNDM": "pndm",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "LCM": "lcm",
}


class A1111Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1  # -1: a fresh one
    sampler_name: str | None = None
    scheduler: str | None = None  # the web UI 1.9's noise schedule; "Karras" with "DPM++ 2M" is dpmpp_2m_karras
    steps: int = 0  # 0: the task's default
    cfg_scale: float | None = None
    width: int = 0  # 0: the model's native size (img2img: the image's)
    height: int = 0
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1, le=1, description="batch count: 1 (ask for batch_size images instead)")
    override_settings: dict[str, Any] = Field(default_factory=dict)

    def to_request(self) -> Request:
        return Request(
            self.prompt,
            negative_prompt=self.negative_prompt or None,
            num_inference_steps=self.steps or None,
            guidance_scale=self.cfg_scale,
            height=self.height or None,
            width=self.width or None,
            seed=None if self.seed == -1 else self.seed,
            num_images=self.batch_size,
            scheduler=self.scheduler_name(),
        )

    def scheduler_name(self) -> str | None:
        name = self.sampler_name
        if name is None or name in SAMPLERS.values():
            return name
        if self.scheduler and self.scheduler.lower() == "karras" and not name.endswith("Karras"):
            name = f"{name} Karras"
        if name not in SAMPLERS:
            raise ApiError("invalid_input", f"unknown sampler_name {name!r} (known: {', '.join(SAMPLERS)})")
        return SAMPLERS[name]

    @property
    def model(self) -> str | None:
        return self.override_settings.get("sd_model_checkpoint")


class A1111Img2ImgBody(A1111Body):
    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: float = 4.0


@router.post("/txt2img")
async def txt2img(body: A1111Body, http: HttpRequest) -> dict[str, Any]:
    server: Server = http.app.state.server
    job = server.submit("txt2img", body.to_request(), model=body.model)
    return await _answer(body, await server.wait(job, http))


@router.post("/img2img")
async def img2img(body: A1111Img2ImgBody, http: HttpRequest) -> dict[str, Any]:
    server: Server = http.app.state.server

    def inputs() -> dict[str, Any]:
        own: dict[str, Any] = {"image": decode_image(body.init_images[0], "init_images[0]")}
        own["strength"] = body.denoising_strength
        if body.mask is not None:
            own.update(mask=decode_image(body.mask, "mask"), mask_blur=body.mask_blur)
        return own

    task = "img2img" if body.mask is None else "inpaint"
    job = server.submit(task, body.to_request(), await run_in_threadpool(inputs), model=body.model)
    return await _answer(body, await server.wait(job, http))


async def _answer(body: A1111Body, result: GenerationResult) -> dict[str, Any]:
    images = await run_in_threadpool(lambda: [b64_png(image) for image in result.images])
    info = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "seed": result.seed,
        "all_seeds": [result.seed] * len(images),  # one seed draws the whole batch
        "sampler_name": result.scheduler,
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "width": result.images[0].width,
        "height": result.images[0].height,
        "timings": result.timings,
    }
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


@router.get("/progress")
async def progress(http: HttpRequest, skip_current_image: bool = False) -> dict[str, Any]:
    """The job running now (the oldest, where several share a batch): its step, ETA and a preview."""
    server: Server = http.app.state.server
    running = [(worker, job) for worker in server.workers.values() for job in worker.running]
    waiting = sum(worker.depth for worker in server.workers.values())
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": len(running) + waiting}
    if not running:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    worker, job = running[0]
    done, total = job.steps
    fraction = done / total if total else 0.0
    elapsed = time.monotonic() - job.started if job.started else 0.0
    eta = elapsed / fraction - elapsed if fraction else 0.0
    state.update(job=job.id, sampling_step=done, sampling_steps=total)
    image = None
    if not skip_current_image and (preview := await run_in_threadpool(worker.preview_image, job)) is not None:
        image = b64_png(preview)
    return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": image, "textinfo": None}


@router.get("/sd-models")
async def sd_models(http: HttpRequest) -> list[dict[str, str]]:
    server: Server = http.app.state.server
    return [{"title": name, "model_name": name, "filename": name} for name in server.workers]


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [ours], "options": {}} for name, ours in SAMPLERS.items()]
