"""The native JSON API: ``POST /v1/txt2img``, ``/v1/img2img``, ``/v1/inpaint``, ``/v1/outpaint``, ``/v1/upscale``,
and ``GET /v1/progress``.

The body takes every option of the Python API's task (schemas.py). The answer is JSON with base64 PNGs,
the seed and the stage timings, or, for one image asked for with ``Accept: image/png``, the PNG itself
(seed and timings in the ``X-Seed`` and ``X-Timings`` headers). A request's id is its ``X-Request-Id`` (a client
may choose it): ``GET /v1/progress?id=ID`` follows that request while it waits and runs.
"""

# no `from __future__ import annotations`: FastAPI reads each route's body type from its annotation at run time
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from sdtrt.runtime.generation import GenerationResult
from sdtrt.serve.errors import ApiError
from sdtrt.serve.progress import job_progress, queued, running
from sdtrt.serve.schemas import GenerationBody, b64_png, encode_png, task_bodies
from sdtrt.serve.server import Server
from sdtrt.serve.worker import Job


def make_router() -> APIRouter:
    """One route per registered task (runtime/tasks), its body made from the task's record."""
    router = APIRouter(prefix="/v1", tags=["native"])
    for task, body in task_bodies().items():
        router.add_api_route(f"/{task}", _route(task, body), methods=["POST"], name=task)
    router.add_api_route("/progress", progress, methods=["GET"])
    return router


def _route(task: str, body_type: type[GenerationBody]) -> Callable[..., Awaitable[Response]]:
    async def generate(body: body_type, http: HttpRequest) -> Response:  # type: ignore[valid-type]
        server: Server = http.app.state.server
        inputs = await run_in_threadpool(body.task_inputs)  # decodes images: off the event loop
        job = server.submit(task, body.to_request(), inputs, body.model, body.loras)
        result = await server.wait(job, http)
        return await run_in_threadpool(_answer, job, result, http.headers.get("accept", ""))

    generate.__name__ = task
    generate.__doc__ = f"{task}: every option of Pipeline.{task}, images as base64."
    return generate


def _answer(job: Job, result: GenerationResult, accept: str) -> Response:
    if "image/png" in accept and "application/json" not in accept:
        if len(result.images) != 1:
            raise ApiError("invalid_input", f"image/png answers one image, not {len(result.images)}: accept JSON")
        headers = {"X-Seed": str(result.seed), "X-Timings": json.dumps(_timings(result))}
        return Response(encode_png(result.images[0]), media_type="image/png", headers=headers)
    body: dict[str, Any] = {
        "images": [b64_png(image) for image in result.images],
        "seed": result.seed,
        "timings": _timings(result),
        "model": job.model,
        "scheduler": result.scheduler,
        "backend": result.backend,
        "request_id": job.id,
    }
    return JSONResponse(body)


def _timings(result: GenerationResult) -> dict[str, float]:
    return {stage: round(seconds, 6) for stage, seconds in result.timings.items()}


async def progress(http: HttpRequest, id: str | None = None, skip_preview: bool = False) -> dict[str, Any]:
    """The running jobs (or the one whose request id is ``id``, running or queued): step, steps, ETA and a PNG
    preview of the current latents in base64 (the tiny VAE's where the model has one; ``preview_source`` says)."""
    server: Server = http.app.state.server
    jobs = [(worker, job, "running") for worker, job in running(server)]
    waiting = queued(server)
    if id is not None:
        jobs = [entry for entry in jobs + [(w, job, "queued") for w, job in waiting] if entry[1].id == id]
        if not jobs:
            raise ApiError(
                "not_found", f"no request with id {id[:64]!r} is running or waiting (finished ones are gone)"
            )

    def answer() -> dict[str, Any]:
        entries = [job_progress(worker, job, state, not skip_preview).native() for worker, job, state in jobs]
        return {"jobs": entries, "queued": len(waiting)}

    return await run_in_threadpool(answer)
