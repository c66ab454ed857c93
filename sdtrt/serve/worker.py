"""One worker thread per loaded model: it owns the Pipeline, takes jobs from a bounded queue and runs
compatible ones together as one UNet batch (runtime/batching.py).

A job is one HTTP request's generation. Its Future is resolved with the GenerationResult or an ApiError.
Between denoising steps a job checks whether its client went away or its deadline passed, and stops if so.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdtrt.engine.errors import InvalidInputError, SdtrtError
from sdtrt.runtime.batching import BatchCall, run_batch
from sdtrt.runtime.generation import GenerationResult
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.plan import Plan
from sdtrt.runtime.runner import NetworkRunner
from sdtrt.serve import logs
from sdtrt.serve.config import ServeConfig
from sdtrt.serve.errors import ApiError
from sdtrt.serve.metrics import Metrics
from sdtrt.serve.preview import JobPreview, LatentPreview, Preview, Previewer

log = logging.getLogger(__name__)

WARMUP_PROMPT = "warm-up"


class JobStopped(Exception):
    """Raised between steps of a job whose client went away or whose deadline passed."""


@dataclass(eq=False)
class Job:
    """One request's generation: what to run, its deadline and progress, and the Future of its result."""

    model: str
    plan: Plan  # the request, checked and resolved by the model's pipeline
    loras: dict[str, float]  # adapter -> scale for this request; adapters left out run at scale 0
    deadline: float  # time.monotonic() past which the job stops with 504
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    batch_key: tuple | None = None  # jobs with equal keys may share a UNet batch; None: runs alone
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    steps: tuple[int, int] = (0, 0)  # (done, total) denoising steps
    preview: JobPreview = field(default_factory=JobPreview)  # what progress routes show of it (serve/preview.py)
    stop_reason: str | None = None  # "cancelled" (the client went away) or "deadline"
    future: Future = field(default_factory=Future)

    @property
    def images(self) -> int:
        """Images the job draws: prompts x num_images."""
        return self.plan.images

    def cancel(self) -> None:
        """Stop this job at its next step (or drop it from the queue): its client went away."""
        self.stop_reason = self.stop_reason or "cancelled"

    def progress(self, done: int, total: int) -> None:
        self.steps = (done, total)
        if self.stop_reason is None and time.monotonic() > self.deadline:
            self.stop_reason = "deadline"
        if self.stop_reason is not None:
            raise JobStopped(self.stop_reason)

    def stopped_error(self) -> ApiError:
        if self.stop_reason == "deadline":
            return ApiError(
                "deadline", f"the request passed its deadline after {time.monotonic() - self.created:.1f} s"
            )
        return ApiError("cancelled", "the client went away")


class ModelWorker:
    """The thread that owns one model's Pipeline and serves its queue."""

    def __init__(self, folder: Path, name: str, config: ServeConfig, metrics: Metrics) -> None:
        self.folder, self.name, self.config, self.metrics = folder, name, config, metrics
        self.pipeline: Pipeline | None = None
        self.previews: Previewer | None = None  # set once the model is loaded
        self.ready = threading.Event()
        self.failure: str | None = None  # why the model could not be loaded
        self.running: list[Job] = []
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._seconds_per_batch = 1.0  # moving average, for Retry-After
        self._pad_to: int | None = None
        self._thread = threading.Thread(target=self._serve, name=f"sdtrt-worker-{name}", daemon=True)

    def start(self) -> None:
        if self._thread.ident is None:  # once: a Ray replica starts its server before the app's lifespan does
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse what is queued (503), stop the running jobs at their next step, and wait for the thread."""
        with self._cond:
            self._stopping = True
            queued, self._queue = list(self._queue), deque()
            for job in self.running:
                job.cancel()
            self._cond.notify_all()
        for job in queued:
            _resolve(job, ApiError("unavailable", "the server is shutting down"))
        self._thread.join(timeout)
        if self.pipeline is not None:
            self.pipeline.close()

    @property
    def alive(self) -> bool:
        """The thread runs, or has not been started yet, or stopped loading a model it reports on /readyz."""
        return self._thread.is_alive() or self._thread.ident is None or self.failure is not None

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def lora_names(self) -> list[str]:
        return [] if self.pipeline is None else list(self.pipeline.loras)

    def submit(self, job: Job) -> None:
        """Queue ``job``; ApiError queue_full (429, with Retry-After) when the queue is full."""
        with self._cond:
            if self._stopping:
                raise ApiError("unavailable", "the server is shutting down")
            if len(self._queue) >= self.config.queue_size:
                batches = len(self._queue) / self.config.max_batch + 1
                retry = max(1, math.ceil(batches * self._seconds_per_batch))
                raise ApiError(
                    "queue_full",
                    f"model {self.name!r} has {len(self._queue)} requests waiting, its limit: retry in {retry} s",
                    headers={"Retry-After": str(retry)},
                )
            self._queue.append(job)
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))
            self._cond.notify()

    def withdraw(self, job: Job) -> None:
        """Take ``job`` out of the queue if it still waits there (it was given up on); its slot is free at once."""
        with self._cond:
            if job not in self._queue:
                return
            self._queue.remove(job)
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))
        _resolve(job, job.stopped_error())

    # ----------------------------------------------------------------------------------------------
    # The worker thread

    def _serve(self) -> None:
        try:
            self._load()
        except Exception as exc:  # the server stays up and says why on /readyz
            self.failure = str(exc) if isinstance(exc, SdtrtError) else f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", self.name, self.failure, exc_info=not isinstance(exc, SdtrtError))
            return
        self.ready.set()
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _load(self) -> None:
        t0 = time.perf_counter()
        limits = self.config.limits
        pipe = Pipeline.load(
            self.folder,
            self.config.backend,
            self.config.precision,
            max_side=limits.max_side,
            max_images=limits.max_images,
        )
        self.pipeline = pipe
        # a backend that compiles each input shape (and keeps only the latest few) gets batched UNet calls padded to
        # one shape, the largest under guidance, or batches of changing size would recompile the UNet again and again
        if pipe.backend.record.compiles_per_shape and self.config.max_batch > 1:
            self._pad_to = 2 * self.config.max_batch
        for model, path in self.config.loras:
            if model == self.name:
                pipe.load_lora(path, scale=0.0)
        warm = self._warm_up(pipe) if self.config.warmup else None
        linear = None if warm is None else LatentPreview.fit(warm.latents[0], warm.images[0])
        self.previews = Previewer(pipe.manifest, linear, self.metrics.preview_seconds.labels(self.name).observe)
        if warm is not None:
            self.previews.warm_up(pipe.sessions, warm.latents[:1])
        log.info("model %s ready on %s in %.1f s", self.name, pipe.backend.kind, time.perf_counter() - t0)

    def _warm_up(self, pipe: Pipeline) -> GenerationResult | None:
        """One small generation (sessions opened, first shapes compiled), whose image the linear preview map is
        fitted on. None for a model that draws nothing from a prompt alone (an upscaler, an inpainting model, a
        refiner)."""
        try:
            return pipe.txt2img(WARMUP_PROMPT, num_inference_steps=2, seed=0)
        except InvalidInputError as exc:
            log.info("model %s: no warm-up generation, no linear previews (%s)", self.name, self.client_text(str(exc)))
            return None

    def _next_batch(self) -> list[Job] | None:
        """The next jobs to run together: the oldest waiting job and the compatible ones behind it."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            head = self._queue.popleft()
            batch, images = [head], head.images
            if head.batch_key is not None:
                for job in list(self._queue):
                    if job.batch_key == head.batch_key and images + job.images <= self.config.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        images += job.images
            self.metrics.queue_depth.labels(self.name).set(len(self._queue))
            self.running = batch
            return batch

    def _run(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in jobs:  # a job whose client left or whose deadline passed while it waited never starts
            if job.stop_reason is None and now > job.deadline:
                job.stop_reason = "deadline"
            if job.stop_reason is not None:
                _resolve(job, job.stopped_error())
            else:
                live.append(job)
        if not live:
            return
        t0 = time.perf_counter()
        self.metrics.in_flight.labels(self.name).inc(len(live))
        try:
            self._set_loras(live[0].loras)
            calls = [self._call(job) for job in live]
            results, unet_batches = run_batch(self.pipeline, calls, self._pad_to)
        except Exception as exc:
            results, unet_batches = [exc] * len(live), []
        finally:
            self.metrics.in_flight.labels(self.name).dec(len(live))
            with self._cond:
                self.running = []
        for size in unet_batches:
            self.metrics.batch_size.labels(self.name).observe(size)
        for job, result in zip(live, results, strict=True):
            self._finish(job, result)
        elapsed = time.perf_counter() - t0
        self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * elapsed
        ids = ", ".join(job.id for job in live)
        calls = ", ".join(f"{n} x batch {size}" for size, n in sorted(Counter(unet_batches).items()))
        log.info("model %s ran %s in %.2f s (UNet calls: %s)", self.name, ids, elapsed, calls or "none")

    def _call(self, job: Job) -> BatchCall:
        context = contextvars.copy_context()
        context.run(logs.request_id.set, job.id)
        job.started = time.monotonic()
        self.metrics.stage_seconds.labels(self.name, "queue").observe(job.started - job.created)

        def on_sample(sample: np.ndarray, runner: NetworkRunner) -> None:
            if self.previews is not None:
                self.previews.on_sample(job.preview, sample, job.steps[0], runner)

        return BatchCall(job.plan, job.progress, on_sample, context)

    def _set_loras(self, scales: dict[str, float]) -> None:
        """Give every loaded adapter the scale the batch asks for (0 where it asks for none)."""
        assert self.pipeline is not None
        for name, current in self.pipeline.loras.items():
            if (wanted := scales.get(name, 0.0)) != current:
                self.pipeline.set_lora_scale(name, wanted)

    def _finish(self, job: Job, result: GenerationResult | Exception) -> None:
        token = logs.request_id.set(job.id)
        try:
            if isinstance(result, GenerationResult):
                self.metrics.record_images(self.name, len(result.images))
                for stage, seconds in result.timings.items():
                    self.metrics.stage_seconds.labels(self.name, stage).observe(seconds)
                _resolve(job, result)
            elif isinstance(result, JobStopped):
                log.info("stopped at step %d of %d: %s", *job.steps, job.stop_reason)
                _resolve(job, job.stopped_error())
            elif isinstance(result, SdtrtError):
                _resolve(job, ApiError("invalid_input", self.client_text(str(result))))
            else:
                log.error("generation failed", exc_info=result)
                _resolve(job, ApiError("internal", f"internal error (request {job.id}); the server log has details"))
        finally:
            logs.request_id.reset(token)

    def client_text(self, message: str) -> str:
        """An error's text as a client may see it: the model's folder named by the model's name, not its path."""
        for path in sorted({str(self.folder.resolve()), str(self.folder)}, key=len, reverse=True):
            message = message.replace(path, f"model {self.name!r}")
        return message

    def preview(self, job: Job) -> Preview | None:
        """The latest picture of ``job``'s current latents (serve/preview.py), or None before its first step; the job
        counts as watched for a few seconds (its tiny VAE previews are decoded)."""
        return None if self.previews is None else self.previews.show(job.preview)

    def queued(self) -> list[Job]:
        """The jobs waiting in the queue, oldest first."""
        with self._cond:
            return list(self._queue)


def _resolve(job: Job, outcome: GenerationResult | ApiError) -> None:
    if job.future.done():
        return
    if isinstance(outcome, ApiError):
        job.future.set_exception(outcome)
    else:
        job.future.set_result(outcome)
