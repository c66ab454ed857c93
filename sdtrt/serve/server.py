"""The server's state behind every route: one worker per model, the metrics, and the way a request becomes a
job (checked against the limits before it is queued) and a job's result comes back to its HTTP request."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from starlette.requests import Request as HttpRequest

from sdtrt.engine.errors import SdtrtError
from sdtrt.runtime.generation import GenerationResult
from sdtrt.runtime.request import Request
from sdtrt.serve.config import ServeConfig, model_name
from sdtrt.serve.errors import ApiError
from sdtrt.serve.logs import request_id
from sdtrt.serve.metrics import Metrics
from sdtrt.serve.worker import Job, ModelWorker

log = logging.getLogger(__name__)

DEADLINE_GRACE_S = 5.0  # how long past its deadline a running job may take to stop at its next step


class Server:
    """The models and their workers; ``submit`` queues a request, ``wait`` awaits it for an HTTP request."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.workers = {model_name(f): ModelWorker(f, model_name(f), config, self.metrics) for f in config.models}

    def start(self) -> None:
        for worker in self.workers.values():
            worker.start()

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()

    @property
    def ready(self) -> bool:
        return all(worker.ready.is_set() for worker in self.workers.values())

    def worker(self, model: str | None) -> ModelWorker:
        """The worker of the served model named ``model`` (None: the only one served)."""
        if model is None:
            if len(self.workers) == 1:
                return next(iter(self.workers.values()))
            raise ApiError("invalid_input", f"name a model (served: {', '.join(self.workers)})")
        if model not in self.workers:
            raise ApiError("not_found", f"no model named {model!r} is served (served: {', '.join(self.workers)})")
        return self.workers[model]

    def submit(
        self,
        task: str,
        request: Request,
        inputs: dict[str, Any] | None = None,
        model: str | None = None,
        loras: dict[str, float] | None = None,
    ) -> Job:
        """Check ``request`` against the server's limits and the model's, and queue it; ApiError otherwise."""
        worker = self.worker(model)
        if not worker.ready.is_set() or worker.pipeline is None:
            raise ApiError("unavailable", f"model {worker.name!r} is {worker.failure or 'still loading'}")
        self._check_limits(request)
        loras = dict(loras or {})
        if unknown := sorted(set(loras) - set(worker.lora_names)):
            configured = ", ".join(worker.lora_names) or "none"
            raise ApiError("invalid_input", f"no LoRA adapter named {unknown[0]!r} (configured: {configured})")
        for name, scale in loras.items():
            if not math.isfinite(scale):
                raise ApiError("invalid_input", f"LoRA {name!r}: the scale must be a finite number, got {scale}")
        try:
            plan = worker.pipeline.plan(task, request, inputs)
        except SdtrtError as exc:
            raise ApiError("invalid_input", worker.client_text(str(exc))) from None
        job = Job(worker.name, plan, loras, deadline=time.monotonic() + self.config.deadline_s)
        if (rid := request_id.get()) != "-":  # the HTTP request's id: its log lines and the job's match
            job.id = rid
        if plan.batch_key is not None and self.config.max_batch > 1:  # the same adapters at the same scales too
            job.batch_key = (*plan.batch_key, tuple(sorted((name, scale) for name, scale in loras.items() if scale)))
        worker.submit(job)
        return job

    def _check_limits(self, request: Request) -> None:
        limits = self.config.limits
        steps = request.num_inference_steps
        if isinstance(steps, int) and steps > limits.max_steps:
            raise ApiError(
                "invalid_input", f"num_inference_steps {steps} is above this server's limit of {limits.max_steps}"
            )
        texts = [*_texts(request.prompt), *_texts(request.negative_prompt)]
        longest = max((len(t) for t in texts), default=0)
        if longest > limits.max_prompt_chars:
            raise ApiError(
                "invalid_input",
                f"a prompt of {longest} characters is above this server's limit of {limits.max_prompt_chars}",
            )

    async def wait(self, job: Job, http: HttpRequest) -> GenerationResult:
        """The result of ``job`` for the HTTP request ``http``; the job is stopped if the client goes away."""
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            while True:
                budget = job.deadline - time.monotonic() + (DEADLINE_GRACE_S if job.started else 0.0)
                done, _ = await asyncio.wait({result, gone}, timeout=max(budget, 0.0), return_when="FIRST_COMPLETED")
                if result in done:
                    return result.result()
                if gone in done:
                    self._abandon(job, "cancelled")
                    raise job.stopped_error()
                if job.started is None or budget <= 0:  # waited in the queue past the deadline, or would not stop
                    self._abandon(job, "deadline")
                    raise job.stopped_error()
        except asyncio.CancelledError:  # the ASGI server (or Ray Serve) cancelled the request
            self._abandon(job, "cancelled")
            raise
        finally:
            gone.cancel()
            result.add_done_callback(_retrieved)  # an abandoned job's error is its cancellation, logged above

    def _abandon(self, job: Job, reason: str) -> None:
        """Nobody waits for ``job`` any more: take it out of the queue, or stop it at its next step."""
        job.stop_reason = job.stop_reason or reason
        self.workers[job.model].withdraw(job)
        log.info("request %s abandoned: %s", job.id, reason)


def _retrieved(future: asyncio.Future) -> None:
    """Mark ``future``'s outcome as seen (asyncio logs an unseen exception at ERROR when the future is freed)."""
    if not future.cancelled():
        future.exception()


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client closes its connection (the body has been read: the next message says so)."""
    while True:
        with contextlib.suppress(Exception):
            message = await http.receive()
            if message.get("type") == "http.disconnect":
                return
        await asyncio.sleep(0.05)


def _texts(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
