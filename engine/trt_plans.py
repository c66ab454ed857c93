"""The TensorRT plan store: importing TensorRT, what a plan is tied to, and reading and writing plans.

Plans live in DIR/trt/<compute capability>-trt<version>/ as ``<component>.<key>.plan`` with a JSON
sidecar ``<component>.<key>.json`` (engine/profiles.py: PlanMeta). The plan is written first and
the sidecar second, each atomically, so a sidecar always describes a complete plan.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from types import ModuleType

from sdtrt.engine import cuda
from sdtrt.engine.errors import BackendUnavailableError
from sdtrt.engine.fsutil import write_bytes_atomic, write_json_atomic
from sdtrt.engine.manifest import Manifest
from sdtrt.engine.profiles import PlanMeta, RuntimeInfo, plan_dir, plan_warnings, select_plan

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"


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
