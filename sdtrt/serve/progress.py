"""What the progress routes (Automatic1111's ``GET /sdapi/v1/progress``, the native ``GET /v1/progress``) say of a
job: its step, ETA and latest preview (serve/preview.py), each route in its own shape."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sdtrt.serve.preview import Preview
from sdtrt.serve.schemas import b64_png
from sdtrt.serve.server import Server
from sdtrt.serve.worker import Job, ModelWorker


@dataclass(frozen=True)
class JobProgress:
    job: Job
    state: str  # "running" or "queued"
    done: int  # denoising steps done
    total: int  # steps in all (0 before its first step)
    fraction: float
    eta_s: float  # seconds left, from the pace so far (0 before its first step)
    preview: Preview | None

    def native(self) -> dict[str, Any]:
        """The native route's entry for this job."""
        preview = self.preview
        return {
            "id": self.job.id,
            "model": self.job.model,
            "state": self.state,
            "step": self.done,
            "steps": self.total,
            "progress": round(self.fraction, 6),
            "eta_s": round(self.eta_s, 3),
            "preview": None if preview is None else b64_png(preview.image),
            "preview_source": None if preview is None else preview.source,
            "preview_step": None if preview is None else preview.step,
        }


def running(server: Server) -> list[tuple[ModelWorker, Job]]:
    """The jobs running now, per model, the oldest of a batch first."""
    return [(worker, job) for worker in server.workers.values() for job in worker.running]


def queued(server: Server) -> list[tuple[ModelWorker, Job]]:
    return [(worker, job) for worker in server.workers.values() for job in worker.queued()]


def job_progress(worker: ModelWorker, job: Job, state: str, with_preview: bool) -> JobProgress:
    """``job``'s progress; its preview where ``with_preview`` (asking for it makes the job watched: the tiny VAE
    decodes its next steps). Call it off the event loop: the linear map's preview is computed here."""
    done, total = job.steps
    fraction = done / total if total else 0.0
    elapsed = time.monotonic() - job.started if job.started else 0.0
    eta = elapsed / fraction - elapsed if fraction else 0.0
    preview = worker.preview(job) if with_preview and state == "running" else None
    return JobProgress(job, state, done, total, fraction, eta, preview)
