"""Stable Diffusion pipelines over an sdtrt artifact folder: txt2img, img2img, inpaint, outpaint, upscale.

The façade users hold. Behind it: the engine's Artifact (manifest, backend, sessions), the
runtime's Sessions (sessions + LoRA), a Conditioner (prompts -> UNet conditioning) and, per call,
a Generation (request, noise, loop, VAE, result) that a task function drives.

Every task takes the options of a Request as keyword arguments (documented there: negative_prompt,
num_inference_steps, guidance_scale, height, width, seed, num_images, scheduler) beside its own;
``run(task, request, ...)`` takes a Request as it is, as a server would.

Requests above the pipeline's Limits (pixels per side, images per request) are refused before any work;
an allocation failure during a generation (MemoryError, an ONNX Runtime or OpenVINO allocation error)
is one SdtrtError line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from sdtrt.engine.artifact import Artifact, open_artifact
from sdtrt.engine.backends import BackendChoice, is_backend_error
from sdtrt.engine.errors import ALLOCATION_FAILURE, InvalidInputError, SdtrtError
from sdtrt.engine.manifest import Manifest
from sdtrt.engine.session import Session
from sdtrt.runtime.conditioning import Conditioner
from sdtrt.runtime.generation import Generation, GenerationResult, NormalSource, ProgressCallback
from sdtrt.runtime.plan import Plan, make_plan
from sdtrt.runtime.request import Limits, Request
from sdtrt.runtime.runner import NetworkRunner
from sdtrt.runtime.sessions import Sessions
from sdtrt.runtime.task_methods import task_method
from sdtrt.runtime.tasks import TASKS, Task, model_limits
from sdtrt.runtime.tokenizer import CLIPTokenizer

__all__ = ["GenerationResult", "Pipeline", "Plan", "Request"]

LOAD_OPTIONS = ("backend", "precision", "max_side", "max_images")


class Pipeline:
    """A loaded artifact folder. ``Pipeline.load(dir)`` then ``pipe.txt2img("a prompt")`` and friends."""

    def __init__(self, artifact: Artifact, limits: Limits | None = None) -> None:
        self.artifact = artifact
        self.sessions = Sessions(artifact)
        manifest = artifact.manifest
        self.limits = model_limits(manifest) if limits is None else limits
        tokenizers = {name: CLIPTokenizer.from_dir(artifact.folder / tok) for name, tok in manifest.tokenizers.items()}
        self.conditioner = Conditioner(tokenizers, artifact.inputs("unet"), manifest.force_zeros_for_empty_prompt)

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        backend: str = "auto",
        precision: str | None = None,
        *,
        max_side: int | None = None,
        max_images: int | None = None,
        **unknown: Any,
    ) -> Pipeline:
        """Open an artifact folder written by ``sdtrt export``; ``backend`` is "auto" or a backend's name;
        ``precision`` the arithmetic precision where the backend offers a choice (openvino: "bf16", the
        default where the CPU has native bf16, or "fp32").

        ``max_side`` (pixels per image side) and ``max_images`` (per request: prompts x num_images) are
        the ceiling above which requests are refused before any work; by default the environment's
        SDTRT_MAX_SIDE and SDTRT_MAX_IMAGES, else twice the model's native side (an x4 upscaler's
        output: four times twice its native side, its tiles bounding the memory) and 16 images.
        """
        if unknown:
            raise InvalidInputError(
                f"Pipeline.load has no option {', '.join(map(repr, sorted(unknown)))} "
                f"(options: {', '.join(LOAD_OPTIONS)})"
            )
        if not isinstance(folder, (str, os.PathLike)):
            raise InvalidInputError(f"Pipeline.load takes an artifact folder's path, got {folder!r}")
        artifact = open_artifact(folder, backend, precision)
        try:
            pipe = cls(artifact, model_limits(artifact.manifest, max_side, max_images))
        except Exception:
            artifact.close()
            raise
        for network in (*pipe.artifact.manifest.tokenizers, "unet", "vae_decoder"):  # what every task runs
            pipe.sessions.session(network)
        return pipe

    @property
    def manifest(self) -> Manifest:
        return self.artifact.manifest

    @property
    def backend(self) -> BackendChoice:
        """The backend the networks run on, and why it was chosen."""
        return self.artifact.backend

    @property
    def tokenizers(self) -> dict[str, CLIPTokenizer]:
        return self.conditioner.tokenizers

    def session(self, network: str) -> Session:
        """The session of ``network`` (opened on first use, with the loaded LoRA adapters' weights); the plain UNet's
        may be ``unet_cache``'s, whose outputs add the cached feature (Sessions.serving)."""
        return self.sessions.session(network)

    def close(self) -> None:
        self.sessions.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------------
    # LoRA adapters

    def load_lora(self, path: str | os.PathLike[str], name: str | None = None, scale: float = 1.0) -> str:
        """Apply the LoRA adapter in ``path`` (.safetensors; diffusers/PEFT or kohya keys) at ``scale``.

        Returns its name (default: the file name without extension), which set_lora_scale and
        unload_lora take. Adapters add up: weights = base + sum(scale_i * delta_i), recomputed from
        the export's base weights at every change, so any order of loads, scales and unloads
        leaves no residue. No re-export: ONNX Runtime sessions reopen with the new initializers,
        TensorRT plans are refitted in place. A file that does not fit this model is one error and
        changes nothing.
        """
        return self.sessions.load_lora(path, name, scale)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change the scale of the loaded adapter ``name`` (0 turns it off without unloading it)."""
        self.sessions.set_lora_scale(name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the adapter ``name``, or all of them (None): what is left runs on the base weights plus the rest."""
        self.sessions.unload_lora(name)

    @property
    def loras(self) -> dict[str, float]:
        """The loaded adapters and their scales, in loading order."""
        return self.sessions.loras

    # ----------------------------------------------------------------------------------------------
    # The tasks: txt2img, img2img, inpaint, outpaint, upscale (runtime/tasks) and any task registered there

    def plan(self, task: str | Task, request: Request, inputs: Mapping[str, Any] | None = None) -> Plan:
        """``request`` for ``task`` with the task's own ``inputs`` (image, mask, strength, ... and ControlNet
        options), checked once against this model: defaults filled in, CFG on or off, the batch key."""
        return make_plan(
            task, request, inputs or {}, limits=self.limits, sessions=self.sessions, conditioner=self.conditioner
        )

    def run(
        self,
        task: str,
        request: Request,
        *,
        progress: ProgressCallback | None = None,
        rng: NormalSource | None = None,
        runner: NetworkRunner | None = None,
        **inputs: Any,
    ) -> GenerationResult:
        """Run ``task`` (a name in sdtrt.runtime.tasks.TASKS) for ``request``; ``inputs`` are the task's own
        (image, mask, strength, ...: see the task's method). ``plan`` then ``execute``."""
        return self.execute(self.plan(task, request, inputs), progress=progress, rng=rng, runner=runner)

    def execute(
        self,
        plan: Plan,
        *,
        progress: ProgressCallback | None = None,
        rng: NormalSource | None = None,
        runner: NetworkRunner | None = None,
    ) -> GenerationResult:
        """Run a plan of this pipeline's.

        ``progress(done, total)`` is called after each denoising step. ``rng`` replaces the seeded noise
        source: any object with NumPy's ``standard_normal(size, dtype)`` (then pass no seed). ``runner`` runs
        the networks (runtime/runner.py; default: this pipeline's sessions), e.g. a server's batching.
        """
        try:
            generation = Generation(self.sessions, self.conditioner, plan, rng, progress, self.limits, runner)
            return plan.task.run(generation, plan.arguments)
        except Exception as exc:
            if isinstance(exc, SdtrtError) or (detail := _allocation_failure(exc)) is None:
                raise
            raise SdtrtError(
                f"{plan.task.name} ran out of memory on {self.backend.kind} ({detail}): ask for fewer or smaller "
                "images, or lower the ceiling (Pipeline.load(..., max_side=N, max_images=N), SDTRT_MAX_SIDE, "
                "SDTRT_MAX_IMAGES)"
            ) from None

    def __getattr__(self, name: str) -> Callable[..., GenerationResult]:
        """The method of each registered task: ``pipe.txt2img(prompt, **options)``, ``pipe.img2img(prompt, image,
        **options)``: the prompt, the task's input images, then keyword options (the Request's and its own)."""
        if name.startswith("_") or name not in TASKS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return task_method(self, TASKS[name])

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *TASKS})


def _allocation_failure(exc: Exception) -> str | None:
    """What ``exc`` says if it says memory ran out, in one short line: a MemoryError (NumPy's included), or an
    error of a backend's runtime (ONNX Runtime, OpenVINO, CUDA: RuntimeError or their own classes) that says so;
    else None."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError):
        return text[:160] or "MemoryError"
    found = ALLOCATION_FAILURE.search(text) if is_backend_error(exc) else None
    return None if found is None else text[found.start() : found.start() + 160]
