"""Automatic1111's web UI API: ``POST /sdapi/v1/txt2img`` and ``/sdapi/v1/img2img`` (an img2img with a ``mask``
inpaints), ``GET /sdapi/v1/progress`` (progress, ETA and a preview of the current latents), and the lists
``/sdapi/v1/sd-models`` and ``/sdapi/v1/samplers``.

Its clients send many fields of the web UI's own (restore_faces, tiling, ...): those are ignored, as are
sizes and steps left at 0. A size or step count left out is the model's and the task's default, as in
the Python API. The model is ``override_settings.sd_model_checkpoint`` (a served model's name).

ControlNets come as the sd-webui-controlnet extension sends them, ``alwayson_scripts.controlnet.args``: one unit
per ControlNet, ``model`` an attached ControlNet's name (the web UI's "name [hash]" is read as the name),
``image`` base64, ``weight``, ``guidance_start`` / ``guidance_end``, ``control_mode`` "Balanced" (0) or
"ControlNet is more important" (2: diffusers' guess mode), ``module`` "none" (the image is the map) or "canny"
(``threshold_a`` / ``threshold_b``: its thresholds). ``GET /controlnet/model_list`` and ``/controlnet/module_list``
answer as the extension does. LoRA adapters the server was started with (``--lora``) are asked for as the web UI
does, ``<lora:NAME:WEIGHT>`` in the prompt (serve/lora_prompt.py): the tags leave the text the encoder sees.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest

from sdtrt.engine.errors import SdtrtError
from sdtrt.runtime.control_images import canny
from sdtrt.runtime.generation import GenerationResult
from sdtrt.runtime.request import Request
from sdtrt.serve.errors import ApiError
from sdtrt.serve.lora_prompt import split_lora_tags
from sdtrt.serve.progress import job_progress, running
from sdtrt.serve.schemas import b64_png, decode_image
from sdtrt.serve.server import Server

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])
controlnet_router = APIRouter(prefix="/controlnet", tags=["automatic1111"])

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


MAX_THRESHOLD = 10_000  # canny's thresholds act on gradient magnitudes: a few thousand at most
CONTROL_MODULES = ("none", "canny")  # the extension's preprocessors this server runs
GUESS_MODES = {0: False, "Balanced": False, 2: True, "ControlNet is more important": True}  # control_mode ->


class ControlNetUnit(BaseModel):
    """One ControlNet unit of the sd-webui-controlnet extension's API."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    enabled: bool = True
    image: str | dict[str, Any] | None = None  # base64, or {"image": base64, "mask": ...}
    input_image: str | None = None  # the extension's older name for image
    model: str = ""
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int | str = 0
    threshold_a: float = Field(default=-1, le=MAX_THRESHOLD)  # canny's low threshold; < 0: the default (100)
    threshold_b: float = Field(default=-1, le=MAX_THRESHOLD)  # canny's high threshold; < 0: 200

    def control_image(self, index: int) -> Any:
        """The unit's control image, decoded and run through its module."""
        where = f"alwayson_scripts.controlnet.args[{index}]"
        data = self.image.get("image") if isinstance(self.image, dict) else self.image or self.input_image
        if not isinstance(data, str):
            raise ApiError("invalid_input", f"{where}: give the control image as base64 in image")
        image = decode_image(data, f"{where}.image")
        if self.module == "none":
            return image
        low = int(self.threshold_a) if self.threshold_a >= 0 else 100
        high = int(self.threshold_b) if self.threshold_b >= 0 else 200
        try:
            return canny(image, low, high)
        except SdtrtError as exc:  # OpenCV is not installed here
            raise ApiError("invalid_input", f"{where}: module canny: {exc}") from None


class A1111Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

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
    cache_interval: int = Field(default=1, ge=1, description="sdtrt's: step caching, the whole UNet every N-th step")
    vae: str = Field(default="full", description="sdtrt's: \"tiny\", the export's tiny VAE")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)

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
            vae=self.vae,
            cache_interval=self.cache_interval,
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
        model = self.override_settings.get("sd_model_checkpoint")
        if model is not None and not isinstance(model, str):
            raise ApiError("invalid_input", "override_settings.sd_model_checkpoint must be a served model's name")
        return model

    def control_inputs(self) -> dict[str, Any]:
        """The enabled units of ``alwayson_scripts.controlnet`` as the Python API's ControlNet options."""
        script = {name.lower(): value for name, value in self.alwayson_scripts.items()}.get("controlnet") or {}
        args = script.get("args", []) if isinstance(script, dict) else None
        if not isinstance(args, list):
            raise ApiError("invalid_input", "alwayson_scripts.controlnet.args must be a list of ControlNet units")
        try:
            units = [(i, ControlNetUnit.model_validate(unit)) for i, unit in enumerate(args)]
        except ValidationError as exc:
            raise ApiError("invalid_input", f"alwayson_scripts.controlnet: {exc.errors()[0]['msg']}") from None
        units = [(i, unit) for i, unit in units if unit.enabled]
        if not units:
            return {}
        for i, unit in units:
            if unit.module not in CONTROL_MODULES:
                raise ApiError(
                    "invalid_input",
                    f"alwayson_scripts.controlnet.args[{i}]: module {unit.module!r} is not run here (modules: "
                    f"{', '.join(CONTROL_MODULES)}); send the preprocessed map with module none",
                )
            if unit.control_mode not in GUESS_MODES:
                raise ApiError(
                    "invalid_input",
                    f"alwayson_scripts.controlnet.args[{i}]: control_mode {unit.control_mode!r} is not supported "
                    "(Balanced: 0, ControlNet is more important: 2)",
                )
        if len({GUESS_MODES[unit.control_mode] for _, unit in units}) > 1:
            raise ApiError("invalid_input", "alwayson_scripts.controlnet: give every unit the same control_mode")
        return {
            "controlnet": [re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", unit.model) for _, unit in units],
            "control_image": [unit.control_image(i) for i, unit in units],
            "controlnet_conditioning_scale": [unit.weight for _, unit in units],
            "control_guidance_start": [unit.guidance_start for _, unit in units],
            "control_guidance_end": [unit.guidance_end for _, unit in units],
            "guess_mode": GUESS_MODES[units[0][1].control_mode],
        }


class A1111Img2ImgBody(A1111Body):
    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = 0.75
    mask: str | None = None
    mask_blur: float = 4.0


@router.post("/txt2img")
async def txt2img(body: A1111Body, http: HttpRequest) -> dict[str, Any]:
    server: Server = http.app.state.server
    request, loras = _lora_request(body)
    job = server.submit("txt2img", request, await run_in_threadpool(body.control_inputs), body.model, loras)
    return await _answer(body, await server.wait(job, http))


@router.post("/img2img")
async def img2img(body: A1111Img2ImgBody, http: HttpRequest) -> dict[str, Any]:
    server: Server = http.app.state.server

    def inputs() -> dict[str, Any]:
        own: dict[str, Any] = {"image": decode_image(body.init_images[0], "init_images[0]")}
        own["strength"] = body.denoising_strength
        if body.mask is not None:
            own.update(mask=decode_image(body.mask, "mask"), mask_blur=body.mask_blur)
        return own | body.control_inputs()

    task = "img2img" if body.mask is None else "inpaint"
    request, loras = _lora_request(body)
    job = server.submit(task, request, await run_in_threadpool(inputs), body.model, loras)
    return await _answer(body, await server.wait(job, http))


def _lora_request(body: A1111Body) -> tuple[Request, dict[str, float]]:
    """The request with the ``<lora:NAME:WEIGHT>`` tags taken out of its prompt, and those adapters' scales."""
    prompt, loras = split_lora_tags(body.prompt)
    return dataclasses.replace(body.to_request(), prompt=prompt), loras


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
    parameters = body.model_dump(exclude={"init_images", "mask", "alwayson_scripts"})
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


@router.get("/progress")
async def progress(http: HttpRequest, skip_current_image: bool = False) -> dict[str, Any]:
    """The job running now (the oldest, where several share a batch): its step, ETA and a preview (the tiny VAE's
    where the model has one: ``textinfo`` names the source)."""
    server: Server = http.app.state.server
    jobs = running(server)
    waiting = sum(worker.depth for worker in server.workers.values())
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": len(jobs) + waiting}
    if not jobs:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    now = await run_in_threadpool(job_progress, *jobs[0], "running", not skip_current_image)
    state.update(job=now.job.id, sampling_step=now.done, sampling_steps=now.total)
    preview = now.preview
    image = None if preview is None else await run_in_threadpool(b64_png, preview.image)
    info = None if preview is None else f"preview: {preview.source}, step {preview.step}"
    answer = {"progress": now.fraction, "eta_relative": now.eta_s, "state": state}
    return answer | {"current_image": image, "textinfo": info}


@router.get("/sd-models")
async def sd_models(http: HttpRequest) -> list[dict[str, str]]:
    server: Server = http.app.state.server
    return [{"title": name, "model_name": name, "filename": name} for name in server.workers]


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [ours], "options": {}} for name, ours in SAMPLERS.items()]


@controlnet_router.get("/model_list")
async def controlnet_models(http: HttpRequest) -> dict[str, list[str]]:
    """The ControlNets attached to the served models, by name."""
    server: Server = http.app.state.server
    loaded = [worker.pipeline for worker in server.workers.values() if worker.pipeline is not None]
    names = {name for pipeline in loaded for name in pipeline.manifest.controlnets}
    return {"model_list": sorted(names)}


@controlnet_router.get("/module_list")
async def controlnet_modules() -> dict[str, list[str]]:
    return {"module_list": list(CONTROL_MODULES)}
