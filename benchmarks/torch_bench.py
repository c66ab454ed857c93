"""The diffusers peers: PyTorch eager (CPU or CUDA), eager under a CUDA graph, and torch.compile under a CUDA graph.

fp16 on the GPU, fp32 on the CPU ("torch-bf16": eager bf16 on the CPU). The UNet step is called exactly as
diffusers' pipelines call it, so the graph (and the compiled code) made by the step benchmark is the one the
end-to-end run replays.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import PROMPT, Job, StageTimes

MODES = {"torch": "eager", "torch-bf16": "eager", "torch-graph": "graph", "torch-compile": "compile"}


class CudaGraphed:
    """Replays ``fn`` from a CUDA graph, one per call signature (argument structure, shapes, dtypes).

    Tensor arguments are copied into the graph's static input buffers before each replay. The result
    is the graph's static output, valid until the next call: diffusers' loop consumes it at once.
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 3) -> None:
        self.fn = fn
        self.warmup = warmup  # eager calls on a side stream before capture (cuBLAS handles, compilation)
        self._graphs: dict[Any, tuple[Any, list[Any], Any]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils import _pytree as pytree

        leaves, tree = pytree.tree_flatten((args, kwargs))
        key = (str(tree), tuple((x.shape, x.dtype) if isinstance(x, torch.Tensor) else x for x in leaves))
        if key not in self._graphs:
            self._graphs[key] = self._capture(leaves, tree)
        graph, static_leaves, output = self._graphs[key]
        for static, leaf in zip(static_leaves, leaves, strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(leaf)
        graph.replay()
        return output

    def _capture(self, leaves: list[Any], tree: Any) -> tuple[Any, list[Any], Any]:
        import torch
        from torch.utils import _pytree as pytree

        # static inputs live on the GPU, a CPU timestep included: a graph cannot copy from pageable memory
        static = [x.to("cuda", copy=True) if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(static, tree)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.fn(*args, **kwargs)
        return graph, static, output


class _Clock:
    """Marks on the work's timeline: CUDA events on the GPU (no synchronization in the loop), else perf_counter."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self) -> Any:
        import torch

        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000 if self.cuda else end - start


class TorchRunner:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.mode = MODES[job.backend]
        self.cuda = job.device == "cuda"
        self.precision = "fp16" if self.cuda else "bf16" if job.backend == "torch-bf16" else "fp32"
        self.compiles = self.mode != "eager"  # torch.compile and/or CUDA graph capture on the first step
        self.clock = _Clock(self.cuda)
        self.pipe: Any = None

    def load(self) -> None:
        import diffusers
        import torch

        torch.set_num_threads(self.job.threads)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.precision]
        options: dict[str, Any] = {"torch_dtype": dtype}
        index = json.loads((Path(self.job.model_dir) / "model_index.json").read_text())
        # sdtrt runs no safety checker and draws no watermark: neither should its peer
        if "safety_checker" in index:
            options.update(safety_checker=None, requires_safety_checker=False)
        if "XL" in index["_class_name"]:
            options["add_watermarker"] = False
        pipe = diffusers.DiffusionPipeline.from_pretrained(self.job.model_dir, **options).to(self.job.device)
        pipe.set_progress_bar_config(disable=True)
        if self.job.scheduler is not None:
            pipe.scheduler = _diffusers_scheduler(self.job.scheduler, pipe.scheduler.config)
        unet = pipe.unet
        if self.mode == "compile":
            unet.forward = CudaGraphed(torch.compile(unet.forward))
        elif self.mode == "graph":
            unet.forward = CudaGraphed(unet.forward)
        self.pipe = pipe

    def unet_step(self) -> Callable[[], None]:
        """The UNet called as the pipeline calls it, on random inputs at the job's shapes."""
        import torch

        job, pipe = self.job, self.pipe
        unet = pipe.unet
        device, dtype = unet.device, unet.dtype
        generator = torch.Generator().manual_seed(job.seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator).to(device, dtype)

        pipe.scheduler.set_timesteps(job.steps, device=device)
        timestep = pipe.scheduler.timesteps[0]  # (), the loop's dtype and device
        config = unet.config
        added = None
        if config.addition_embed_type == "text_time":  # SDXL: pooled text + 6 size/crop ids per row
            time_ids = torch.tensor([job.height, job.width, 0, 0, job.height, job.width], dtype=dtype)
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            added = {"text_embeds": randn(job.batch, pooled), "time_ids": time_ids.repeat(job.batch, 1).to(device)}
        sample = randn(job.batch, config.in_channels, job.height // 8, job.width // 8)  # (B, 4, H/8, W/8)
        states = randn(job.batch, 77, config.cross_attention_dim)  # (B, 77, D)

        def step() -> None:
            with torch.no_grad():
                unet(
                    sample,
                    timestep,
                    encoder_hidden_states=states,
                    timestep_cond=None,
                    cross_attention_kwargs=None,
                    added_cond_kwargs=added,
                    return_dict=False,
                )
            if self.cuda:
                torch.cuda.synchronize()

        if self.mode != "eager":
            step()  # capture (and compile): timed as the row's compile_s
        return step

    def txt2img(self, latents: np.ndarray, steps: int) -> StageTimes:
        import torch

        job, pipe = self.job, self.pipe
        generator = torch.Generator(job.device).manual_seed(job.seed)  # used by stochastic schedulers only
        initial = torch.from_numpy(latents).to(job.device, pipe.unet.dtype)
        with self._instrumented() as spans:
            start = time.perf_counter()
            pipe(
                PROMPT,
                height=job.height,
                width=job.width,
                num_inference_steps=steps,
                guidance_scale=job.guidance,
                num_images_per_prompt=job.images,
                latents=initial,
                generator=generator,
                output_type="pil",
            )
            if self.cuda:
                torch.cuda.synchronize()
            total = time.perf_counter() - start

        def spent(name: str) -> float:
            return sum(self.clock.seconds(a, b) for a, b in spans[name])

        return StageTimes(
            text_encoder=spent("text_encoder"),
            unet=spent("unet"),
            loop=self.clock.seconds(spans["unet"][0][0], spans["vae_decode"][0][0]),  # first UNet call to the VAE
            loop_steps=len(spans["unet"]),
            vae_decode=spent("vae_decode"),
            total=total,
        )

    @contextlib.contextmanager
    def _instrumented(self) -> Iterator[dict[str, list[tuple[Any, Any]]]]:
        """Wrap the pipeline's networks so each call leaves a (start, end) pair of marks; unwrap after."""
        pipe = self.pipe
        targets = [(pipe.unet, "forward", "unet"), (pipe.vae, "decode", "vae_decode")]
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                targets.append((getattr(pipe, name), "forward", "text_encoder"))
        spans: dict[str, list[tuple[Any, Any]]] = {"unet": [], "vae_decode": [], "text_encoder": []}
        saved = []
        for obj, attr, name in targets:
            saved.append((obj, attr, obj.__dict__.get(attr)))
            setattr(obj, attr, self._timed(getattr(obj, attr), spans[name]))
        try:
            yield spans
        finally:
            for obj, attr, own in saved:
                if own is None:
                    delattr(obj, attr)
                else:
                    setattr(obj, attr, own)

    def _timed(self, fn: Callable[..., Any], spans: list[tuple[Any, Any]]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.clock.mark()
            out = fn(*args, **kwargs)
            spans.append((start, self.clock.mark()))
            return out

        return timed


def _diffusers_scheduler(name: str, config: Any) -> Any:
    """The diffusers twin of sdtrt's scheduler ``name``, from the model's scheduler config."""
    import diffusers

    from sdtrt.runtime.schedulers import SCHEDULERS

    overrides = {"use_karras_sigmas": True} if name == "dpmpp_2m_karras" else {}
    return getattr(diffusers, SCHEDULERS[name].diffusers_class).from_config(config, **overrides)
