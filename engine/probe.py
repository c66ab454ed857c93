"""What each need of a backend is checked by on this machine: a package that imports, a GPU that answers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sdtrt.engine import cuda
from sdtrt.engine.errors import BackendUnavailableError
from sdtrt.engine.ort_session import import_onnxruntime


@dataclass(frozen=True)
class Probe:
    """Whether one need of a backend is met, and what was found or what is missing."""

    ok: bool
    detail: str


def _probe_openvino() -> Probe:
    from sdtrt.engine.openvino_session import import_openvino, native_bf16

    bf16 = "native bf16" if native_bf16() else "no native bf16"
    return Probe(True, f"OpenVINO {import_openvino().__version__.split('-')[0]} CPU, {bf16}")


def _probe_tensorrt() -> Probe:
    from sdtrt.engine.trt_plans import import_tensorrt

    return Probe(True, f"TensorRT {import_tensorrt().__version__}")


def _probe_gpu() -> Probe:
    if cuda.device_count() == 0:
        return Probe(False, "no CUDA GPU found")
    gpu = cuda.device_info(0)
    return Probe(True, "{} (sm{}{})".format(gpu.name, *gpu.compute_capability))


def _probe_ort_cuda() -> Probe:
    ort = import_onnxruntime()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return Probe(False, "onnxruntime has no CUDA provider: pip install 'sdtrt[gpu]' (onnxruntime-gpu)")
    return Probe(True, f"ONNX Runtime {ort.__version__} CUDA")


def _probe_ort_cpu() -> Probe:
    return Probe(True, f"ONNX Runtime {import_onnxruntime().__version__} CPU")


# each need a backend record names -> how this machine is checked for it
PROBES: dict[str, Callable[[], Probe]] = {
    "openvino": _probe_openvino,
    "tensorrt": _probe_tensorrt,
    "gpu": _probe_gpu,
    "ort-cuda": _probe_ort_cuda,
    "ort-cpu": _probe_ort_cpu,
}


def probe(need: str) -> Probe:
    """Check one need of a backend on this machine (a name in PROBES)."""
    try:
        return PROBES[need]()
    except BackendUnavailableError as exc:
        return Probe(False, str(exc))
    except cuda.CudaError as exc:
        return Probe(False, f"no usable CUDA GPU ({exc})")
