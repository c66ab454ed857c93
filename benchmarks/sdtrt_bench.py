"""sdtrt's backends (ort-cpu, openvino, ort-cuda, trt) through the public runtime: Pipeline.load and txt2img.

Imports no torch: the worker's peak RSS is the runtime's own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from benchmarks.harness import PROMPT, SDTRT_BACKENDS, Job, StageTimes
from sdtrt.runtime.pipeline import Pipeline


class SdtrtRunner:
    compiles = False  # engines are built (and cached) by Pipeline.load: part of load_s

    def __init__(self, job: Job) -> None:
        if job.export_dir is None:
            raise ValueError(f"{job.backend} needs an sdtrt export folder")
        self.job = job
        self.pipe: Pipeline | None = None
        self.precision = ""

    def load(self) -> None:
        backend, precision = SDTRT_BACKENDS[self.job.backend]
        self.pipe = Pipeline.load(self.job.export_dir, backend=backend, precision=precision)
        self.precision = self.pipe.backend.compute  # the arithmetic's precision, not the ONNX variant's

    def unet_step(self) -> Callable[[], None]:
        """session.run on random inputs in the manifest's dtypes: sample (batch, C, H/8, W/8), timestep (batch,),
        encoder_hidden_states (batch, 77, D) and whatever conditioning the model's UNet takes besides."""
        pipe, job = self.pipe, self.job
        session = pipe.session("unet")
        dims = {"batch": job.batch, "latent_height": job.height // 8, "latent_width": job.width // 8}
        rng = np.random.default_rng(job.seed)
        feeds = {}
        for spec in pipe.artifact.inputs("unet").values():
            shape = spec.bind(dims)
            if spec.name == "timestep":
                feeds[spec.name] = np.full(shape, 999, dtype=spec.dtype)
            elif np.dtype(spec.dtype).kind == "f":  # latents, text states, SDXL's pooled text and size ids
                feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return lambda: session.run(feeds)

    def txt2img(self, latents: np.ndarray, steps: int) -> StageTimes:
        loop_steps = 0

        def count(done: int, total: int) -> None:
            nonlocal loop_steps
            loop_steps = total

        job = self.job
        result = self.pipe.txt2img(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=job.guidance,
            height=job.height,
            width=job.width,
            num_images=job.images,
            scheduler=job.scheduler,
            latents=latents,
            progress=count,
            cache_interval=job.cache_interval,
            vae=job.vae,
        )
        t = result.timings
        return StageTimes(
            text_encoder=t["text_encoder"],
            unet=t["unet"],
            loop=t["unet"] + t["scheduler"],
            loop_steps=loop_steps,
            vae_decode=t["vae_decode"],
            total=t["total"],
        )
