"""Which backend runs the networks, and opening a component's session on it.

Backends: "trt" (TensorRT plans, CUDA graphs), "ort-cuda" (ONNX Runtime's CUDA provider, CUDA
graphs), "ort-cpu". "auto" takes the first of them whose needs are met: TensorRT when it imports
and a GPU is present (plans that do not exist yet are built on first load), else ONNX Runtime CUDA
when its provider is there and a GPU is present, else ONNX Runtime on the CPU. The choice and the
reason are logged. The GPU backends run the fp16 export; the VAE decoder's fp16 output is checked
for NaN/inf and recomputed at fp32 when it overflowed.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdtrt.engine import cuda
from sdtrt.engine.errors import BackendUnavailableError, InvalidInputError, ManifestError
from sdtrt.engine.manifest import ComponentFile, Manifest
from sdtrt.engine.ort_session import OrtCpuSession, import_onnxruntime
from sdtrt.engine.profiles import ProfileSpec
from sdtrt.engine.session import Session

log = logging.getLogger(__name__)

BACKENDS = ("auto", "trt", "ort-cuda", "ort-cpu")
AUTO_ORDER = ("trt", "ort-cuda", "ort-cpu")
NEEDS = {"trt": ("tensorrt", "gpu"), "ort-cuda": ("ort-cuda", "gpu"), "ort-cpu": ("ort-cpu",)}  # probe names
PRECISION = {"trt": "fp16", "ort-cuda": "fp16", "ort-cpu": "fp32"}
FP32_FALLBACK = ("vae_decoder",)  # SD 1.x VAE decoders overflow in fp16 on some latents


@dataclass(frozen=True)
class BackendChoice:
    kind: str  # one of BACKENDS but "auto"
    precision: str  # which ONNX variant it runs: "fp32" | "fp16"
    reason: str  # why this one, for the log and the result
    scope: cuda.DeviceScope | None = field(default=None, compare=False, repr=False)  # TensorRT: stream + memory

    def __post_init__(self) -> None:
        if self.kind == "trt" and self.scope is None:  # one stream and one activation buffer per choice
            object.__setattr__(self, "scope", cuda.DeviceScope())


@dataclass(frozen=True)
class Probe:
    """Whether one need of a backend is met, and what was found or what is missing."""

    ok: bool
    detail: str


def select_backend(requested: str, probe: Callable[[str], Probe]) -> tuple[str, str]:
    """The backend to use and why, given ``probe(need)`` for the needs in NEEDS (pure).

    A need is probed only when a backend under consideration has it, so asking for "ort-cpu"
    never imports TensorRT. An explicit request that cannot be met is an error naming each unmet need.
    """
    if requested not in BACKENDS:
        raise InvalidInputError(f"unknown backend {requested!r} (choose from {', '.join(BACKENDS)})")

    def unmet(kind: str) -> list[str]:
        return [result.detail for result in map(probe, NEEDS[kind]) if not result.ok]

    if requested != "auto":
        if missing := unmet(requested):
            raise BackendUnavailableError(f"backend {requested!r} is unavailable: {'; '.join(missing)}")
        return requested, "requested"
    skipped: list[str] = []
    for kind in AUTO_ORDER:
        missing = unmet(kind)
        if not missing:
            found = ", ".join(probe(need).detail for need in NEEDS[kind])
            return kind, "; ".join([found, *skipped])
        skipped.append(f"{kind} skipped: {'; '.join(missing)}")
    raise BackendUnavailableError(f"no backend is available: {'; '.join(skipped)}")


def probe(need: str) -> Probe:
    """Check one need of a backend on this machine: "tensorrt", "gpu", "ort-cuda" or "ort-cpu"."""
    try:
        if need == "tensorrt":
            from sdtrt.engine.trt_plans import import_tensorrt

            return Probe(True, f"TensorRT {import_tensorrt().__version__}")
        if need == "gpu":
            if cuda.device_count() == 0:
                return Probe(False, "no CUDA GPU found")
            gpu = cuda.device_info(0)
            return Probe(True, "{} (sm{}{})".format(gpu.name, *gpu.compute_capability))
        ort = import_onnxruntime()
        if need == "ort-cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            return Probe(False, "onnxruntime has no CUDA provider: pip install 'sdtrt[gpu]' (onnxruntime-gpu)")
        return Probe(True, f"ONNX Runtime {ort.__version__}" + (" CUDA" if need == "ort-cuda" else " CPU"))
    except BackendUnavailableError as exc:
        return Probe(False, str(exc))
    except cuda.CudaError as exc:
        return Probe(False, f"no usable CUDA GPU ({exc})")


def choose_backend(requested: str = "auto", probe: Callable[[str], Probe] = probe) -> BackendChoice:
    """Resolve ``requested`` to a concrete backend; an unavailable explicit request is a clear error."""
    results: dict[str, Probe] = {}

    def cached(need: str) -> Probe:
        if need not in results:
            results[need] = probe(need)
        return results[need]

    kind, reason = select_backend(requested, cached)
    choice = BackendChoice(kind, PRECISION[kind], reason)
    log.info("backend %s (%s): %s", choice.kind, choice.precision, choice.reason)
    return choice


def load_session(
    choice: BackendChoice,
    folder: str | os.PathLike[str],
    manifest: Manifest,
    component: str,
    *,
    profile: ProfileSpec | None = None,
    build: bool = True,
) -> Session:
    """Load ``component`` of the artifact folder on the chosen backend.

    TensorRT: ``profile`` picks the plan (default: the newest that loads here); a missing plan is
    built when ``build`` is true, else an error naming the command that builds it.
    """
    precision = component_precision(choice, manifest, component)
    if choice.kind == "ort-cpu":
        file = manifest.component_file(component, precision)
        return OrtCpuSession(Path(folder) / file.path, weight_map=_weight_map(folder, file))
    session = _open_gpu(choice, folder, manifest, component, precision, profile, build)
    if precision == "fp16" and component in FP32_FALLBACK:
        open_fp32 = None
        if "fp32" in manifest.components[component].files:
            fp32_profile = session.profile if choice.kind == "trt" else None  # the fp16 plan's own profile
            open_fp32 = functools.partial(_open_gpu, choice, folder, manifest, component, "fp32", fp32_profile, build)
        session = Fp32Fallback(session, open_fp32, component)
    return session


def component_precision(choice: BackendChoice, manifest: Manifest, component: str) -> str:
    """The ONNX variant ``component`` runs at on this backend: the CPU runs fp32; the GPU backends
    fp16 where the export has it, else the variant it has (an fp32-only export runs fp32)."""
    available = manifest.components[component].files if component in manifest.components else {}
    if choice.kind == "ort-cpu" or choice.precision in available or not available:
        return choice.precision  # a missing component is reported by manifest.component_file
    other = next(iter(available))
    log.info("%s has no %s export; running its %s one", component, choice.precision, other)
    return other


def _weight_map(folder: str | os.PathLike[str], file: ComponentFile) -> Path | None:
    return None if file.weights is None else Path(folder) / file.weights


def _open_gpu(
    choice: BackendChoice,
    folder: str | os.PathLike[str],
    manifest: Manifest,
    component: str,
    precision: str,
    profile: ProfileSpec | None,
    build: bool,
) -> Session:
    if choice.kind == "trt":
        from sdtrt.engine.trt_session import open_trt_session

        return open_trt_session(folder, manifest, component, precision, choice.scope, profile=profile, build=build)
    from sdtrt.engine.ort_cuda import OrtCudaSession

    file = manifest.component_file(component, precision)
    return OrtCudaSession(Path(folder) / file.path, weight_map=_weight_map(folder, file))


class Fp32Fallback:
    """An fp16 session whose non-finite outputs are recomputed by its fp32 twin (opened on first need).

    Stable Diffusion 1.x VAE decoders overflow in fp16 on some latents; the NaN that follows would
    become a black image. Here it becomes a warning (once) and an fp32 run of the same inputs. An
    export without the fp32 variant, or an fp32 run that is not finite either, is an error.
    """

    def __init__(self, primary: Session, open_fp32: Callable[[], Session] | None, name: str) -> None:
        self.name = name
        self.inputs = primary.inputs
        self.outputs = primary.outputs
        self._primary = primary
        self._open_fp32 = open_fp32
        self._fp32: Session | None = None
        self._warned = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._primary.run(feeds)
        if _finite(outputs):
            return outputs
        if not self._warned:
            log.warning("%s produced NaN/inf at fp16 (an fp16 overflow); re-running it at fp32", self.name)
            self._warned = True
        if self._open_fp32 is None:
            raise ManifestError(
                f"{self.name} produced NaN/inf at fp16 and this export has no fp32 {self.name} to fall back to: "
                "re-export with --precision fp32 fp16"
            )
        if self._fp32 is None:
            self._fp32 = self._open_fp32()
        cast = {n: np.asarray(a).astype(self._fp32.inputs[n].dtype, copy=False) for n, a in feeds.items()}
        exact = self._fp32.run(cast)
        if not _finite(exact):
            raise InvalidInputError(f"{self.name}: the output is not finite at fp32 either: its inputs hold NaN/inf")
        return {n: a.astype(self.outputs[n].dtype, copy=False) for n, a in exact.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Only the base weights: the networks this wraps (the VAE decoder) have no weight map."""
        if weights:
            raise InvalidInputError(f"{self.name} has no weight map: its weights cannot be changed")

    def close(self) -> None:
        self._primary.close()
        if self._fp32 is not None:
            self._fp32.close()
            self._fp32 = None


def _finite(arrays: Mapping[str, np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")
