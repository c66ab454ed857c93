"""The TensorRT plan store: which plan serves a network here, and reading and writing plans.

Plans live in DIR/trt/<compute capability>-trt<version>/ as ``<component>.<key>.plan`` with a JSON
sidecar ``<component>.<key>.json`` (PlanMeta). A plan is keyed by what makes it invalid (the ONNX
content hash, the precision, the input shape ranges), its folder names what it is tied to (the
TensorRT version and the GPU's compute capability: RuntimeInfo), and its sidecar is checked before
the plan is ever deserialized (plan_problems, select_plan). The plan is written first and the
sidecar second, each atomically, so a sidecar always describes a complete plan. TensorRT and CUDA
are imported on first use: all but runtime_info and trt_logger runs, and is tested, without them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from sdtrt.engine import cuda
from sdtrt.engine.errors import BackendUnavailableError
from sdtrt.engine.fsutil import write_bytes_atomic, write_json_atomic
from sdtrt.engine.manifest import Manifest
from sdtrt.engine.profiles import ProfileSpec, ShapeRange

log = logging.getLogger(__name__)

PLAN_FORMAT = 1
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class RuntimeInfo:
    """What a plan is tied to: the TensorRT version that builds or loads it and the GPU it runs on."""

    trt_version: str  # tensorrt.__version__, e.g. "10.8.0.43"
    compute_capability: tuple[int, int]  # (9, 0) for H100
    gpu_name: str

    @property
    def folder_name(self) -> str:
        major, minor = self.compute_capability
        return f"sm{major}{minor}-trt{self.trt_version}"

    def describe(self) -> str:
        major, minor = self.compute_capability
        return f"TensorRT {self.trt_version} on {self.gpu_name} (sm{major}{minor})"


def plan_dir(folder: str | os.PathLike[str], runtime: RuntimeInfo) -> Path:
    """DIR/trt/<compute capability>-trt<version>/: plans, their sidecars and the timing cache."""
    return Path(folder) / "trt" / runtime.folder_name


def plan_key(onnx_sha256: str, precision: str, shapes: Mapping[str, ShapeRange]) -> str:
    """16 hex digits over everything in a plan that the folder name does not already pin."""
    payload = {
        "format": PLAN_FORMAT,
        "onnx": onnx_sha256,
        "precision": precision,
        "shapes": {name: [list(s) for s in shapes[name]] for name in sorted(shapes)},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlanMeta:
    """The JSON sidecar written beside each plan: what it was built from, by what, for which GPU."""

    component: str
    precision: str
    onnx_sha256: str
    profile: ProfileSpec
    shapes: dict[str, ShapeRange]
    trt_version: str
    compute_capability: tuple[int, int]
    gpu_name: str
    plan_size: int  # bytes, checked before deserializing
    created: str  # ISO 8601 UTC; the newest compatible plan wins when several match
    format: int = PLAN_FORMAT

    @property
    def key(self) -> str:
        return plan_key(self.onnx_sha256, self.precision, self.shapes)

    @property
    def plan_name(self) -> str:
        return f"{self.component}.{self.key}.plan"

    @property
    def sidecar_name(self) -> str:
        return f"{self.component}.{self.key}.json"

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "component": self.component,
            "precision": self.precision,
            "onnx_sha256": self.onnx_sha256,
            "profile": self.profile.to_dict(),
            "shapes": {name: [list(s) for s in r] for name, r in self.shapes.items()},
            "trt_version": self.trt_version,
            "compute_capability": list(self.compute_capability),
            "gpu_name": self.gpu_name,
            "plan_size": self.plan_size,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> PlanMeta:
        major, minor = (int(v) for v in d["compute_capability"])
        return cls(
            format=int(d["format"]),
            component=str(d["component"]),
            precision=str(d["precision"]),
            onnx_sha256=str(d["onnx_sha256"]),
            profile=ProfileSpec.from_dict(d["profile"]),
            shapes={str(k): tuple(tuple(int(x) for x in s) for s in v) for k, v in d["shapes"].items()},
            trt_version=str(d["trt_version"]),
            compute_capability=(major, minor),
            gpu_name=str(d["gpu_name"]),
            plan_size=int(d["plan_size"]),
            created=str(d["created"]),
        )


def plan_problems(meta: PlanMeta, runtime: RuntimeInfo, plan_size: int | None) -> list[str]:
    """Why a plan must not be deserialized here (empty when it may be).

    A plan only loads in the TensorRT version that built it, on a GPU of the same compute
    capability; loading anything else can fail deep inside TensorRT, so it is refused up front.
    """
    problems = []
    if meta.format != PLAN_FORMAT:
        problems.append(f"sidecar format {meta.format}, this sdtrt writes {PLAN_FORMAT}")
    if meta.trt_version != runtime.trt_version:
        problems.append(f"built by TensorRT {meta.trt_version}, this is TensorRT {runtime.trt_version}")
    if meta.compute_capability != runtime.compute_capability:
        built = "sm{}{}".format(*meta.compute_capability)
        here = "sm{}{}".format(*runtime.compute_capability)
        problems.append(f"built for {meta.gpu_name} ({built}), this GPU is {runtime.gpu_name} ({here})")
    if plan_size is None:
        problems.append("the plan file is missing")
    elif plan_size != meta.plan_size:
        problems.append(f"the plan file has {plan_size} bytes, its sidecar says {meta.plan_size}")
    return problems


def plan_warnings(meta: PlanMeta, runtime: RuntimeInfo) -> list[str]:
    """Reasons to be wary of a loadable plan: another GPU model of the same compute capability."""
    if meta.compute_capability == runtime.compute_capability and meta.gpu_name != runtime.gpu_name:
        return [f"built on {meta.gpu_name}, running on {runtime.gpu_name}: it loads, but may run slower"]
    return []


def select_plan(
    candidates: Mapping[str, tuple[PlanMeta, int | None]],
    component: str,
    precision: str,
    onnx_sha256: str,
    runtime: RuntimeInfo,
) -> tuple[PlanMeta | None, list[str]]:
    """The newest loadable plan of ``component`` built from this ONNX file at this precision.

    ``candidates`` maps a sidecar's name to its metadata and its plan's size on disk (None when
    missing). Returns the choice and one line per plan of this network that was passed over.
    """
    chosen: PlanMeta | None = None
    passed_over = []
    for name, (meta, size) in sorted(candidates.items()):
        if meta.component != component or meta.precision != precision:
            continue
        if meta.onnx_sha256 != onnx_sha256:
            passed_over.append(f"{name}: built from another export of {component} (the ONNX file changed)")
            continue
        if problems := plan_problems(meta, runtime, size):
            passed_over.append(f"{name}: {'; '.join(problems)}")
            continue
        if chosen is None or meta.created > chosen.created:
            chosen = meta
    return chosen, passed_over


# --- plans on disk --------------------------------------------------------------------------------


def read_candidates(directory: Path) -> dict[str, tuple[PlanMeta, int | None]]:
    """Every readable sidecar in ``directory`` with the size of its plan (None when the plan is gone)."""
    found = {}
    for sidecar in sorted(directory.glob("*.json")):
        try:
            meta = PlanMeta.from_dict(json.loads(sidecar.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable plan sidecar %s: %s", sidecar, exc)
            continue
        plan = directory / meta.plan_name
        found[sidecar.name] = (meta, plan.stat().st_size if plan.is_file() else None)
    return found


def find_plan(
    folder: str | os.PathLike[str], manifest: Manifest, component: str, precision: str, runtime: RuntimeInfo
) -> tuple[Path, PlanMeta] | None:
    """The newest plan of ``component`` that may be loaded here, or None; passed-over plans are logged."""
    directory = plan_dir(folder, runtime)
    onnx = manifest.component_file(component, precision)
    meta, passed_over = select_plan(read_candidates(directory), component, precision, onnx.sha256, runtime)
    for line in passed_over:
        log.warning("not loading TensorRT plan %s", line)
    if meta is None:
        return None
    for line in plan_warnings(meta, runtime):
        log.warning("TensorRT plan %s: %s", meta.plan_name, line)
    return directory / meta.plan_name, meta


def write_plan(directory: Path, meta: PlanMeta, plan) -> Path:
    """Write ``plan`` (bytes or TensorRT's IHostMemory) and then its sidecar, each atomically."""
    path = directory / meta.plan_name
    write_bytes_atomic(path, memoryview(plan))
    write_json_atomic(directory / meta.sidecar_name, meta.to_dict())
    return path


# --- importing TensorRT ---------------------------------------------------------------------------


def import_tensorrt() -> ModuleType:
    """The tensorrt module; a clear error when it is not installed or its libraries do not load."""
    try:
        import tensorrt
    except ImportError as exc:
        if exc.name == "tensorrt":
            raise BackendUnavailableError("tensorrt is not installed: pip install 'sdtrt[gpu]'") from None
        raise BackendUnavailableError(f"tensorrt does not load: {exc}") from None
    except OSError as exc:  # its shared libraries (libnvinfer, CUDA) are missing or broken
        raise BackendUnavailableError(f"tensorrt does not load: {exc}") from None
    return tensorrt


@functools.cache
def trt_logger():
    """TensorRT's messages on Python logging (its INFO as DEBUG; VERBOSE dropped)."""
    trt = import_tensorrt()
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.ERROR,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
    }
    trt_log = logging.getLogger("sdtrt.engine.tensorrt")

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, level, msg: str) -> None:
            if level in levels:
                trt_log.log(levels[level], "%s", msg)

    return Logger()


def runtime_info(device: int = 0) -> RuntimeInfo:
    """The TensorRT version and the GPU that plans are built for and loaded on here."""
    trt = import_tensorrt()
    gpu = cuda.device_info(device)
    return RuntimeInfo(trt.__version__, gpu.compute_capability, gpu.name)
