"""Stable Diffusion pipelines over an sdtrt artifact folder: txt2img, img2img, inpaint, outpaint, upscale.

The façade users hold. Behind it: the engine's Artifact (manifest, backend, sessions), the
runtime's Networks (sessions + LoRA), a Conditioner (prompts -> UNet conditioning) and, per call,
a Generation (request, noise, loop, VAE, result) that a task function drives.

Every task takes the options of a Request as keyword arguments (documented there: negative_prompt,
num_inference_steps, guidance_scale, height, width, seed, num_images, scheduler) beside its own;
``run(task, request, ...)`` takes a Request as it is, as a server would.

Requests above the pipeline's Limits (pixels per side, images per request) are refused before any work;
an allocation failure during a generation (MemoryError, an ONNX Runtime or OpenVINO allocation error)
is one SdtrtError line.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

from sdtrt.engine.artifact import Artifact, open_artifact
from sdtrt.engine.backends import BackendChoice
from sdtrt.engine.errors import ALLOCATION_FAILURE, InvalidInputError, SdtrtError, is_backend_error
from sdtrt.engine.manifest import Manifest
from sdtrt.engine.session import Session
from sdtrt.runtime import image as imageio
from sdtrt.runtime import inpainting, tasks
from sdtrt.runtime.conditioning import Conditioner
from sdtrt.runtime.control import CONTROL_OPTIONS, check_control
from sdtrt.runtime.generation import Generation, GenerationResult, NormalSource, ProgressCallback
from sdtrt.runtime.request import REQUEST_OPTIONS, Limits, Request
from sdtrt.runtime.sessions import Networks
from sdtrt.runtime.tokenizer import CLIPTokenizer

__all__ = ["GenerationResult", "Pipeline", "Request"]

TASK_FUNCTIONS: dict[str, Callable[..., GenerationResult]] = {
    "txt2img": tasks.txt2img,
    "img2img": tasks.img2img,
    "inpaint": inpainting.inpaint,
    "outpaint": inpainting.outpaint,
    "upscale": tasks.upscale,
}
LOAD_OPTIONS = ("backend", "precision", "max_side", "max_images")


class Pipeline:
    """A loaded artifact folder. ``Pipeline.load(dir)`` then ``pipe.txt2img("a prompt")`` and friends."""

    def __init__(self, artifact: Artifact, limits: Limits | None = None) -> None:
        self.artifact = artifact
        self.networks = Networks(artifact)
        manifest = artifact.manifest
        self.limits = tasks.model_limits(manifest) if limits is None else limits
        tokenizers = {name: CLIPTokenizer.from_dir(artifact.folder / tok) for name, tok in manifest.tokenizers.items()}
        self.conditioner = Conditioner(
            self.networks, tokenizers, artifact.inputs("unet"), manifest.force_zeros_for_empty_prompt
        )

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
            pipe = cls(artifact, tasks.model_limits(artifact.manifest, max_side, max_images))
        except Exception:
            artifact.close()
            raise
        for network in (*pipe.artifact.manifest.tokenizers, "unet", "vae_decoder"):  # what every task runs
            pipe.networks.session(network)
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
        """The session of ``network`` (opened on first use, with the loaded LoRA adapters' weights)."""
        return self.networks.session(network)

    def close(self) -> None:
        self.networks.close()

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
        return self.networks.load_lora(path, name, scale)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change the scale of the loaded adapter ``name`` (0 turns it off without unloading it)."""
        self.networks.set_lora_scale(name, scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove the adapter ``name``, or all of them (None): what is left runs on the base weights plus the rest."""
        self.networks.unload_lora(name)

    @property
    def loras(self) -> dict[str, float]:
        """The loaded adapters and their scales, in loading order."""
        return self.networks.loras

    # ----------------------------------------------------------------------------------------------
    # The tasks

    def run(
        self,
        task: str,
        request: Request,
        *,
        progress: ProgressCallback | None = None,
        rng: NormalSource | None = None,
        **inputs: Any,
    ) -> GenerationResult:
        """Run ``task`` (a name in TASKS) for ``request``; ``inputs`` are the task's own (image, mask,
        strength, ...: see the task's method).

        ``progress(done, total)`` is called after each denoising step. ``rng`` replaces the seeded noise
        source: any object with NumPy's ``standard_normal(size, dtype)`` (then pass no seed).
        """
        if task not in TASK_FUNCTIONS:
            raise InvalidInputError(f"unknown task {task!r} (tasks: {', '.join(TASK_FUNCTIONS)})")
        if not isinstance(request, Request):
            raise InvalidInputError(f"run takes a Request (sdtrt.runtime.request), got {type(request).__name__}")
        function = TASK_FUNCTIONS[task]
        own = list(inspect.signature(function).parameters)[1:]  # after the Generation
        if unknown := sorted(set(inputs) - set(own) - set(CONTROL_OPTIONS)):
            raise InvalidInputError(
                f"{task} has no option {', '.join(map(repr, unknown))} (its own: {', '.join(own)}; "
                f"shared: {', '.join(REQUEST_OPTIONS)}, progress, rng)"
            )
        checked = request.checked(task, self.limits)
        control = check_control(task, inputs, self.networks)  # ControlNet options: images loaded, all checked
        try:
            generation = Generation(self.networks, self.conditioner, checked, rng, progress, self.limits, control)
            return function(generation, **inputs)
        except Exception as exc:
            if isinstance(exc, SdtrtError) or (detail := _allocation_failure(exc)) is None:
                raise
            raise SdtrtError(
                f"{task} ran out of memory on {self.backend.kind} ({detail}): ask for fewer or smaller images, or "
                "lower the ceiling (Pipeline.load(..., max_side=N, max_images=N), SDTRT_MAX_SIDE, SDTRT_MAX_IMAGES)"
            ) from None

    def _task(self, task: str, prompt: str | Sequence[str], options: dict[str, Any]) -> GenerationResult:
        """Split keyword options into the Request's and the task's own, then run."""
        shared = {name: options.pop(name) for name in REQUEST_OPTIONS if name in options}
        return self.run(task, Request(prompt, **shared), **options)

    def txt2img(self, prompt: str | Sequence[str], **options: Any) -> GenerationResult:
        """Generate ``num_images`` images per prompt from noise (default 30 steps, guidance 7.5).

        Own options: ``latents`` (B, C, H/8, W/8) replaces the seeded initial noise; ``denoising_end``
        in (0, 1) stops early, leaving the rest of the schedule to a second stage (SDXL's refiner,
        through img2img with ``denoising_start``); ``decode=False`` skips the VAE and returns only
        latents. Timings in the result, in seconds: text_encoder, unet (all steps), scheduler (the
        NumPy loop outside the UNet), vae_decode and total.

        ControlNets (txt2img, img2img, inpaint), with diffusers' names: ``control_image`` (one per
        ControlNet), ``controlnet`` (attached names; default all), ``controlnet_conditioning_scale``,
        ``control_guidance_start`` / ``control_guidance_end`` and ``guess_mode`` (runtime/control.py).
        Without height and width, txt2img draws at the first control image's size fitted to the model.
        """
        return self._task("txt2img", prompt, options)

    def img2img(self, prompt: str | Sequence[str], image: imageio.ImageInput, **options: Any) -> GenerationResult:
        """Transform ``image`` by ``prompt``: it is noised to ``strength`` (default 0.8) of the schedule
        and denoised (default 50 steps).

        The image is resized (Lanczos) to ``height`` x ``width``: a side left out keeps the image's aspect
        ratio; with neither, its own size, scaled down (aspect kept) to the model's native area where larger
        (a 4000x2000 photo on SD 1.5: 704x320), rounded down to the model's size multiple. As in
        diffusers, only the last ``int(steps * strength)`` steps run; strength 1 starts from pure noise,
        and a strength too small for one step returns the image's VAE round trip.

        ``image`` may instead be latents (B, C, h, w) left by a first stage stopped at
        ``denoising_end`` (SDXL base -> refiner): with ``denoising_start`` the same fraction, the
        loop continues from them without adding noise, and ``strength`` is ignored.
        """
        return self._task("img2img", prompt, {"image": image, **options})

    def inpaint(
        self, prompt: str | Sequence[str], image: imageio.ImageInput, mask: imageio.ImageInput, **options: Any
    ) -> GenerationResult:
        """Repaint the white part of ``mask`` (same size as ``image``) by ``prompt`` (default 50 steps), at
        img2img's default size.

        Inpainting models (a 9-channel UNet) see the mask and the masked image at every step; any
        ordinary model inpaints by latent blending, as diffusers does. Own options: ``strength``
        (default 1) as img2img's, except that one too small for a single step is an error;
        ``mask_blur`` > 0 pastes the original pixels back over the result through a mask feathered
        by a Gaussian of that radius (in pixels), hiding seams; 0 (the default) returns the model's
        output as diffusers does.
        """
        return self._task("inpaint", prompt, {"image": image, "mask": mask, **options})

    def outpaint(self, prompt: str | Sequence[str], image: imageio.ImageInput, **options: Any) -> GenerationResult:
        """Extend ``image`` by ``left``, ``right``, ``top`` and ``bottom`` pixels and paint the new area.

        The canvas is the image with its border pixels stretched outwards, grown on the right and
        bottom to the model's size multiple; the mask covers the new area plus ``overlap`` (default
        16) pixels of the old one, and the result is blended back over the original through a mask
        feathered by ``mask_blur`` (default 8). One pass extends each side by at most half the
        model's native size; call again on the result for more. ``strength`` is inpaint's.
        """
        return self._task("outpaint", prompt, {"image": image, **options})

    def upscale(self, prompt: str | Sequence[str], image: imageio.ImageInput, **options: Any) -> GenerationResult:
        """Upscale ``image`` 4x with an x4-upscaler export, guided by ``prompt`` (default 75 steps, guidance 9).

        The low-resolution image is rounded down to the UNet's size step, noised to ``noise_level``
        (default 20) and fed to the UNet beside the latents. Inputs larger than ``tile_size``
        (default: the model's native input size) are cut into tiles overlapping by ``tile_overlap``
        low-res pixels (default: 16, at most a quarter tile), each denoised on its own and feathered
        together, so memory stays bounded; ``tiling=False`` refuses such inputs instead.
        """
        return self._task("upscale", prompt, {"image": image, **options})


def _allocation_failure(exc: Exception) -> str | None:
    """What ``exc`` says if it says memory ran out, in one short line: a MemoryError (NumPy's included), or an
    error of a backend's runtime (ONNX Runtime, OpenVINO, CUDA: RuntimeError or their own classes) that says so;
    else None."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError):
        return text[:160] or "MemoryError"
    found = ALLOCATION_FAILURE.search(text) if is_backend_error(exc) else None
    return None if found is None else text[found.start() : found.start() + 160]
