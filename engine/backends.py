"""Which backend runs the networks, and opening one network's session on it.

Each backend is one record: its name, what it needs on this machine, the ONNX variant it runs, the
arithmetic precisions a user may choose, and how it opens a session. "trt" (TensorRT plans, CUDA
graphs), "ort-cuda" (ONNX Runtime's CUDA provider, CUDA graphs), "openvino" (OpenVINO on the CPU,
bf16 where the CPU has it), "ort-cpu". "auto" takes the first whose needs are met: TensorRT when
it imports and a GPU is present (plans that do not exist yet are built on first load), else ONNX
Runtime CUDA when its provider is there and a GPU is present, else OpenVINO when it is installed,
else ONNX Runtime on the CPU. The choice and the reason are logged. The GPU backends run the fp16
export; a network with an fp32 fallback (engine/network_facts.py) has its fp16 output checked and
recomputed at fp32 when it overflowed. Each backend also names the graph it runs: TensorRT and
OpenVINO the plain export (they fuse on their own); ONNX Runtime its fused graphs where the export has
them (``sdtrt export --ort-fused``), else the plain ones, with a note in the log.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sdtrt.engine import cuda
from sdtrt.engine.errors import (
    ALLOCATION_FAILURE,
    BackendUnavailableError,
    InvalidInputError,
    ManifestError,
    SdtrtError,
)
from sdtrt.engine.fallback import Fp32Fallback
from sdtrt.engine.fsutil import folder_problem
from sdtrt.engine.manifest import ComponentFile, Manifest
from sdtrt.engine.network_facts import NETWORK_FACTS
from sdtrt.engine.ort_session import OrtCpuSession
from sdtrt.engine.probe import Probe, probe
from sdtrt.engine.profiles import ProfileSpec
from sdtrt.engine.session import Session
from sdtrt.engine.weights import WeightMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendChoice:
    kind: str  # a backend's name
    precision: str  # which ONNX variant it runs: "fp32" | "fp16"
    reason: str  # why this one, for the log and the result
    compute: str = ""  # the precision its arithmetic runs at: "fp16", "fp32" or "bf16" (default: the ONNX variant's)
    scope: cuda.DeviceScope | None = field(default=None, compare=False, repr=False)  # TensorRT: stream + memory

    @property
    def record(self) -> Backend:
        """The chosen backend's record: what it needs, runs and opens."""
        return BACKENDS[self.kind]

    def __post_init__(self) -> None:
        if not self.compute:
            object.__setattr__(self, "compute", self.precision)
        if self.record.device_scope and self.scope is None:  # TensorRT: one stream and activation buffer per choice
            object.__setattr__(self, "scope", cuda.DeviceScope())


@dataclass(frozen=True)
class SessionTarget:
    """One network of an artifact folder at one precision, as a backend opens it."""

    folder: Path
    manifest: Manifest
    component: str
    precision: str
    weight_map: WeightMap | None = None  # its changeable weights (LoRA), loaded once by the caller
    profile: ProfileSpec | None = None  # TensorRT: the plan's profile (default: the newest that loads here)
    build: bool = True  # TensorRT: build a missing plan (else an error naming the command that builds it)
    fused: bool = False  # ONNX Runtime's fused graph of the network rather than the plain one

    @property
    def file(self) -> ComponentFile:
        return self.manifest.component_file(self.component, self.precision, self.fused)

    @property
    def path(self) -> Path:
        return self.folder / self.file.path

    def damaged(self, problem: str) -> ManifestError:
        """The one error for a file of this export that cannot serve: ``problem``, then how to rebuild it."""
        return self.manifest.damaged(self.folder, problem)


Opener = Callable[[BackendChoice, SessionTarget], Session]


def _open_trt(choice: BackendChoice, target: SessionTarget) -> Session:
    from sdtrt.engine.trt_session import open_trt_session

    return open_trt_session(
        target.folder,
        target.manifest,
        target.component,
        target.precision,
        choice.scope,
        weight_map=target.weight_map,
        profile=target.profile,
        build=target.build,
    )


def _open_ort_cuda(choice: BackendChoice, target: SessionTarget) -> Session:
    from sdtrt.engine.ort_cuda import OrtCudaSession

    return OrtCudaSession(target.path, weight_map=target.weight_map)


def _open_ort_cpu(choice: BackendChoice, target: SessionTarget) -> Session:
    """fp32, or under int8 the component's static QDQ graph where the export has one (`sdtrt quantize --int8`:
    the UNet's), whose weights are quantized (no weight map: LoRA is refused upstream)."""
    quantized = target.manifest.components[target.component].onnxruntime.get("int8")
    if choice.compute == "int8" and quantized is not None:
        return OrtCpuSession(target.folder / quantized.path)
    if choice.compute == "int8":
        log.info("%s has no ONNX Runtime int8 graph (sdtrt quantize makes the UNet's): runs at fp32", target.component)
    return OrtCpuSession(target.path, weight_map=target.weight_map)


def _open_openvino(choice: BackendChoice, target: SessionTarget) -> Session:
    from sdtrt.engine.openvino_session import OpenVinoSession, openvino_file

    file, precision = openvino_file(target.manifest, target.component, target.file, choice.compute)
    return OpenVinoSession(
        target.folder / file.path,
        file.inputs,
        file.outputs,
        precision=precision,
        cache_dir=openvino_cache_dir(target.folder),
        weight_map=target.weight_map if file is target.file else None,  # an int8 IR's weights are quantized
        digest=file.sha256,
    )


def openvino_cache_dir(folder: Path) -> Path | None:
    """Where OpenVINO caches compiled models: SDTRT_OPENVINO_CACHE ("" turns it off), else the artifact
    folder's openvino/ where the folder is writable (beside TensorRT's trt/), else none."""
    if (env := os.environ.get("SDTRT_OPENVINO_CACHE")) is not None:
        if not env:
            return None
        if (why := folder_problem(env)) is not None:
            raise InvalidInputError(
                f"SDTRT_OPENVINO_CACHE={env}: {why}; name a writable folder, or set it to '' to compile without a cache"
            )
        return Path(env)
    cache = folder / "openvino"  # made by the first compile: until then, the folder it goes in is probed
    return cache if folder_problem(cache if cache.is_dir() else folder) is None else None


def _openvino_compute() -> str:
    from sdtrt.engine.openvino_session import default_compute

    return default_compute()


@dataclass(frozen=True)
class Backend:
    name: str
    needs: tuple[str, ...]  # what probe() must find on this machine
    precision: str  # the ONNX variant it runs
    open: Opener
    strict_precision: bool = False  # True: only that variant (the CPU has no fp16 kernels worth running)
    computes: tuple[str, ...] = ()  # the arithmetic precisions a user may choose (default: the variant's only)
    default_compute: Callable[[], str] | None = None  # the choice when the user makes none
    # the graph it runs: "plain" (the export's, which it fuses itself) or "ort-fused" (ONNX Runtime's
    # fused graph where the export has one at its precision, else the plain one)
    graph: str = "plain"
    # it compiles a network for each input shape and keeps only the latest few (a server pads its batches to one)
    compiles_per_shape: bool = False
    device_scope: bool = False  # its sessions share one CUDA stream and activation buffer (cuda.DeviceScope)
    # the modules its runtime's own exception types live in (besides RuntimeError, which every runtime raises)
    error_modules: tuple[str, ...] = ()

    def compute(self, requested: str | None) -> str:
        """The arithmetic precision to run at: ``requested``, or this backend's default."""
        allowed = self.computes or (self.precision,)
        if requested is None:
            return self.default_compute() if self.default_compute else allowed[0]
        if requested not in allowed:
            choices = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
            raise InvalidInputError(
                f"backend {self.name} runs at {choices}, not {requested!r}"
                + ("" if requested != "bf16" else " (bf16 is the openvino backend's)")
            )
        return requested


# in the order "auto" tries them
BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("trt", ("tensorrt", "gpu"), "fp16", _open_trt, device_scope=True),
        Backend(
            "ort-cuda", ("ort-cuda", "gpu"), "fp16", _open_ort_cuda, graph="ort-fused", error_modules=("onnxruntime",)
        ),
        Backend(
            "openvino",
            ("openvino",),
            "fp32",
            _open_openvino,
            strict_precision=True,
            computes=("bf16", "fp32", "int8"),  # int8: the networks `sdtrt quantize --int8` made IRs of
            default_compute=_openvino_compute,
            compiles_per_shape=True,
            error_modules=("openvino",),
        ),
        # the fused fp32 UNet where the export has it: measured no slower than the plain one (CPU time per UNet
        # step, 1 thread, 2-core machine: SD-1.5-shaped 256x256 batch 2 0.93x the plain's median, tiny model 0.93x)
        Backend(
            "ort-cpu",
            ("ort-cpu",),
            "fp32",
            _open_ort_cpu,
            strict_precision=True,
            computes=("fp32", "int8"),  # int8: the UNet's static QDQ graph `sdtrt quantize --int8` made
            graph="ort-fused",
            error_modules=("onnxruntime",),
        ),
    )
}
BACKEND_NAMES = ("auto", *BACKENDS)  # what a user may ask for


def is_backend_error(exc: BaseException) -> bool:
    """Whether a backend's runtime raised ``exc``: the backends' own exception types (ONNX Runtime's are none of
    them a RuntimeError), or the RuntimeError that OpenVINO, TensorRT and CUDA raise."""
    modules = tuple(module for backend in BACKENDS.values() for module in backend.error_modules)
    return isinstance(exc, RuntimeError) or type(exc).__module__.startswith(modules)


def select_backend(requested: str, probe: Callable[[str], Probe]) -> tuple[str, str]:
    """The backend to use and why, given ``probe(need)`` for the needs of the backends (pure).

    A need is probed only when a backend under consideration has it, so asking for "ort-cpu"
    never imports TensorRT. An explicit request that cannot be met is an error naming each unmet need.
    """
    if requested not in BACKEND_NAMES:
        raise InvalidInputError(f"unknown backend {requested!r} (choose from {', '.join(BACKEND_NAMES)})")

    def unmet(kind: str) -> list[str]:
        return [result.detail for result in map(probe, BACKENDS[kind].needs) if not result.ok]

    if requested != "auto":
        if missing := unmet(requested):
            raise BackendUnavailableError(f"backend {requested!r} is unavailable: {'; '.join(missing)}")
        return requested, "requested"
    skipped: list[str] = []
    for kind, backend in BACKENDS.items():
        missing = unmet(kind)
        if not missing:
            found = ", ".join(probe(need).detail for need in backend.needs)
            return kind, "; ".join([found, *skipped])
        skipped.append(f"{kind} skipped: {'; '.join(missing)}")
    raise BackendUnavailableError(f"no backend is available: {'; '.join(skipped)}")


def choose_backend(
    requested: str = "auto", probe: Callable[[str], Probe] = probe, compute: str | None = None
) -> BackendChoice:
    """Resolve ``requested`` to a concrete backend; an unavailable explicit request is a clear error.

    ``compute`` asks for an arithmetic precision ("bf16" or "fp32" on openvino); default: the backend's own.
    """
    results: dict[str, Probe] = {}

    def cached(need: str) -> Probe:
        if need not in results:
            results[need] = probe(need)
        return results[need]

    kind, reason = select_backend(requested, cached)
    backend = BACKENDS[kind]
    choice = BackendChoice(kind, backend.precision, reason, compute=backend.compute(compute))
    log.info("backend %s (%s ONNX, %s compute): %s", choice.kind, choice.precision, choice.compute, choice.reason)
    return choice


def component_precision(choice: BackendChoice, manifest: Manifest, component: str) -> str:
    """The ONNX variant ``component`` runs at on this backend: the CPU runs fp32; the GPU backends
    fp16 where the export has it, else the variant it has (an fp32-only export runs fp32)."""
    available = manifest.components[component].files if component in manifest.components else {}
    if BACKENDS[choice.kind].strict_precision or choice.precision in available or not available:
        return choice.precision  # a missing component is reported by manifest.component_file
    other = next(iter(available))
    log.info("%s has no %s export; running its %s one", component, choice.precision, other)
    return other


def component_fused(choice: BackendChoice, manifest: Manifest, component: str, precision: str) -> bool:
    """Whether ``component`` runs ONNX Runtime's fused graph at ``precision`` on this backend (pure but the log):
    where the backend runs fused graphs and the export has one; else the plain graph, with a note (at INFO on
    the GPU, where the fused graph is the fast one; the CPU's gain is small)."""
    backend = BACKENDS[choice.kind]
    if backend.graph != "ort-fused" or component not in manifest.components:
        return False
    if precision in manifest.components[component].ort_fused:
        return True
    log.log(
        logging.INFO if "gpu" in backend.needs else logging.DEBUG,
        "%s has no ONNX Runtime fused %s graph in this export (sdtrt export --ort-fused writes the UNet's and "
        "the VAE's); %s runs the plain one",
        component,
        precision,
        choice.kind,
    )
    return False


def open_session(choice: BackendChoice, target: SessionTarget) -> Session:
    """Open ``target`` on the chosen backend; an fp16 network with an fp32 fallback gets its guard.

    A file the backend cannot load, or whose inputs and outputs are not the manifest's, is one
    ManifestError naming the file and the command that rebuilds the export (an allocation that
    fails is one SdtrtError: the file may be fine).
    """
    backend = BACKENDS[choice.kind]
    session = _open_checked(backend, choice, target)
    if target.precision == "fp16" and NETWORK_FACTS[target.component].fp32_fallback:
        open_fp32 = None
        if "fp32" in target.manifest.components[target.component].files:
            profile = getattr(session, "profile", None)  # TensorRT: the fp16 plan's own profile
            fp32 = replace(target, precision="fp32", weight_map=None, profile=profile, fused=False)
            open_fp32 = functools.partial(_open_checked, backend, choice, fp32)
        session = Fp32Fallback(session, open_fp32, target.component)
    return session


def _open_checked(backend: Backend, choice: BackendChoice, target: SessionTarget) -> Session:
    try:
        session = backend.open(choice, target)
    except SdtrtError:
        raise
    except Exception as exc:
        if not _cannot_load(exc):
            raise
        if ALLOCATION_FAILURE.search(str(exc)):  # the file may be fine: rebuilding it would not help
            raise SdtrtError(f"not enough memory to load {target.path} on {backend.name}: {_last_line(exc)}") from exc
        raise target.damaged(f"{backend.name} cannot load {target.path}: {_last_line(exc)}") from exc
    file = target.file
    for kind, found, declared in (("inputs", session.inputs, file.inputs), ("outputs", session.outputs, file.outputs)):
        if sorted(found) != sorted(spec.name for spec in declared):
            session.close()
            names = sorted(spec.name for spec in declared)
            problem = f"{target.path} has {kind} {sorted(found)}, the manifest's {target.component} has {names}"
            raise target.damaged(f"{problem} (another network's file?)")
    return session


def _cannot_load(exc: Exception) -> bool:
    """Whether ``exc`` is how a backend refuses a file: its runtime's own error, or an OSError reading it."""
    return is_backend_error(exc) or isinstance(exc, OSError)


def _last_line(exc: Exception) -> str:
    """The backend's message on one line: its last non-empty line (OpenVINO's first lines are source locations)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
