"""One measurement, the same for every backend: load, time UNet steps, then time txt2img end to end.

A backend is a Runner (sdtrt's in sdtrt_bench, the diffusers peers in torch_bench); ``measure`` drives it
and returns the row's metrics. It runs inside a worker process of its own (see worker.py), so the
peak RSS it reads is that backend's alone.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from benchmarks.measure import device_used_mib, peak_rss_mib, summarize_ms

# sdtrt's benchmark backends: name -> (the engine's backend, the arithmetic precision asked of it; None: its
# default). Pipeline.load takes both; the ONNX variant exported for it is the engine backend's own.
SDTRT_BACKENDS: dict[str, tuple[str, str | None]] = {
    "trt": ("trt", None),
    "ort-cuda": ("ort-cuda", None),
    "openvino": ("openvino", None),  # bf16 where the CPU has native bf16, else fp32
    "openvino-fp32": ("openvino", "fp32"),
    "openvino-int8": ("openvino", "int8"),  # the export quantized first where it is not (benchmarks/prepare.py)
    "ort-cpu": ("ort-cpu", None),
    "ort-cpu-int8": ("ort-cpu", "int8"),  # the UNet's static QDQ graph of the same `sdtrt quantize` (prepare.py)
}
# the diffusers peers: every row's ratios are to these. "torch" is eager (fp32 on the CPU, fp16 on the GPU),
# "torch-bf16" eager bf16 on the CPU
TORCH_BACKENDS = ("torch", "torch-bf16", "torch-graph", "torch-compile")
GPU_BACKENDS = ("trt", "ort-cuda", "torch-graph", "torch-compile")
PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
LATENT_CHANNELS = 4  # Stable Diffusion 1.x, 2.x and XL
WARMUP_E2E_STEPS = 2  # the untimed end-to-end run: every network once at the benchmark's shapes


@dataclass(frozen=True)
class Job:
    """What one worker measures. ``batch`` is the UNet's batch: an even one is batch/2 images with
    classifier-free guidance (one CFG pair per image), an odd one is that many images without it.
    """

    backend: str
    model_dir: str
    export_dir: str | None  # the sdtrt export (sdtrt backends only)
    height: int
    width: int
    batch: int
    steps: int  # denoising steps of the end-to-end run
    scheduler: str | None  # sdtrt's name (None: the model's own)
    warmup: int  # untimed UNet steps first
    timed_steps: int  # timed UNet steps
    e2e_runs: int  # timed end-to-end runs (the row has their medians)
    threads: int  # CPU threads (ORT intra-op, torch)
    device: str  # "cpu" | "cuda": where the torch peers run
    seed: int = 0
    cache_interval: int = 1  # sdtrt: step caching, the whole UNet every N-th step (benchmarks/per_image.py)
    vae: str = "full"  # sdtrt: "tiny" decodes with the export's tiny VAE

    @property
    def cfg(self) -> bool:
        return self.batch % 2 == 0

    @property
    def images(self) -> int:
        return self.batch // 2 if self.cfg else self.batch

    @property
    def guidance(self) -> float:
        return GUIDANCE if self.cfg else 1.0  # guidance 1 turns CFG off in both pipelines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StageTimes:
    """Seconds spent in one end-to-end txt2img run."""

    text_encoder: float
    unet: float  # inside the denoising loop, all steps
    loop: float  # the denoising loop: UNet, scheduler, CFG arithmetic, copies
    loop_steps: int  # UNet evaluations in the loop (PNDM takes one more than asked)
    vae_decode: float
    total: float


class Runner(Protocol):
    precision: str  # set by load()
    compiles: bool  # whether unet_step() compiles or captures (its time is the row's compile_s)

    def load(self) -> None:
        """Everything up to a ready pipeline (weights, sessions, engines)."""

    def unet_step(self) -> Callable[[], None]:
        """A call that runs one UNet step at the job's shapes and returns once its result is ready."""

    def txt2img(self, latents: np.ndarray, steps: int) -> StageTimes:
        """One end-to-end run from these initial latents (images, C, H/8, W/8) float32."""


def measure(
    job: Job, runner: Runner, turn: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
) -> dict[str, Any]:
    """Run the benchmark on ``runner``; the row's metrics (times in ms unless named _s).

    Each unit of work (the load, every UNet step, every end-to-end run) runs inside ``turn()``: a worker
    interleaved with others waits there for its turn, outside the timed region.
    """
    load_before = os.getloadavg()[0]
    device_base = device_used_mib()
    device_seen: list[float] = []

    def checkpoint() -> None:
        if (used := device_used_mib()) is not None:
            device_seen.append(used)

    with turn():
        t0 = time.perf_counter()
        runner.load()
        load_s = time.perf_counter() - t0
    checkpoint()

    with turn():
        t0 = time.perf_counter()
        step = runner.unet_step()
        compile_s = time.perf_counter() - t0
    for _ in range(job.warmup):
        with turn():
            step()
    seconds, cpu_seconds = [], []
    for _ in range(job.timed_steps):
        with turn():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            seconds.append(time.perf_counter() - t0)
            cpu_seconds.append(time.process_time() - c0)
    unet = summarize_ms(seconds)
    checkpoint()

    latents = np.random.default_rng(job.seed).standard_normal(
        (job.images, LATENT_CHANNELS, job.height // 8, job.width // 8), dtype=np.float32
    )
    with turn():
        runner.txt2img(latents, min(job.steps, WARMUP_E2E_STEPS))
    runs = []
    for _ in range(job.e2e_runs):
        with turn():
            runs.append(runner.txt2img(latents, job.steps))
    checkpoint()

    def median(field: str) -> float:
        return float(np.median([getattr(r, field) for r in runs]))

    loop_s, loop_steps = median("loop"), runs[0].loop_steps
    return {
        "precision": runner.precision,
        "load_s": load_s,
        "compile_s": compile_s if runner.compiles else None,
        "unet_ms_median": unet["median"],
        "unet_ms_p90": unet["p90"],
        "unet_ms_min": unet["min"],
        # CPU time of the whole process per step (all its threads): on a shared machine it leaves out the
        # waits for a core that other people's jobs cause (not their use of the shared caches)
        "unet_cpu_ms_median": summarize_ms(cpu_seconds)["median"],
        "text_encoder_ms": median("text_encoder") * 1000,
        "vae_decode_ms": median("vae_decode") * 1000,
        "e2e_ms": median("total") * 1000,
        "loop_ms": loop_s * 1000,
        "loop_steps": loop_steps,
        "step_ms": loop_s / loop_steps * 1000,
        "it_per_s": loop_steps / loop_s,
        "outside_unet_share": float(np.median([(r.loop - r.unet) / r.loop for r in runs])),
        "peak_rss_mib": peak_rss_mib(),
        "load_avg": [load_before, os.getloadavg()[0]],  # the machine's 1-minute load before and after
        "peak_device_mib": max(device_seen) - device_base if device_seen and device_base is not None else None,
    }
