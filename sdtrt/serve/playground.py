"""The playground: a page at ``/`` to try the served models in a browser, and ``GET /v1/models``, what it reads.

The page is static HTML, CSS and JavaScript shipped in the package (static/): no build step, nothing fetched from
elsewhere, so it works offline. It draws with the native API (``POST /v1/txt2img``), follows its request on the
Automatic1111 progress route (``GET /sdapi/v1/progress``: the step and the latent preview of the job whose
``X-Request-Id`` it chose) and cancels by aborting its request, which stops the job at its next step.

The page and its files are served without the API key (they hold nothing of the server's); everything they read
or ask for goes through the API and needs it.

``GET /v1/models`` lists the served models in the shape of OpenAI's model list, each with what a client may ask it
for: its native size and largest side, its LoRA adapters and ControlNets, the task's default steps and guidance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles

from sdtrt.runtime.schedulers import SCHEDULERS
from sdtrt.runtime.tasks import TASKS
from sdtrt.serve.server import Server

STATIC = Path(__file__).parent / "static"
PAGE_PREFIX = "/playground/"  # the page's own files

router = APIRouter(tags=["playground"])


def mount(app: FastAPI) -> None:
    """Serve the page at ``/``, its files under PAGE_PREFIX, and the model list."""
    app.include_router(router)
    app.mount(PAGE_PREFIX.rstrip("/"), StaticFiles(directory=STATIC), name="playground")


def is_page(path: str) -> bool:
    """Whether ``path`` is the page or one of its files (answered without the API key)."""
    return path == "/" or path.startswith(PAGE_PREFIX)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/v1/models")
async def models(http: HttpRequest) -> dict[str, Any]:
    """The served models (OpenAI's list shape) with their options, the schedulers and this server's step limit."""
    server: Server = http.app.state.server
    steps, guidance = TASKS["txt2img"].steps, TASKS["txt2img"].guidance
    data = []
    for name, worker in server.workers.items():
        entry: dict[str, Any] = {"id": name, "object": "model", "owned_by": "sdtrt", "ready": worker.ready.is_set()}
        if (pipe := worker.pipeline) is not None and entry["ready"]:
            m = pipe.manifest
            entry.update(
                family=m.family,
                width=m.default_width,
                height=m.default_height,
                max_side=pipe.limits.max_side,
                max_images=pipe.limits.max_images,
                loras=worker.lora_names,
                controlnets=sorted(m.controlnets),
                previews=worker.previews is not None and worker.previews.available,
            )
        data.append(entry)
    return {
        "object": "list",
        "data": data,
        "schedulers": list(SCHEDULERS),
        "defaults": {"num_inference_steps": steps, "guidance_scale": guidance},
        "max_steps": server.config.limits.max_steps,
    }
