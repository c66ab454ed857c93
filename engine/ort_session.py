"""ONNX Runtime sessions on the CPU."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sdtrt.engine.errors import BackendUnavailableError
from sdtrt.engine.session import TensorSpec, check_feeds

log = logging.getLogger(__name__)

# ONNX Runtime type strings -> NumPy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(uint8)": "uint8",
}


def default_cpu_threads() -> int:
    """Cores this process may use (respects affinity masks and SDTRT_NUM_THREADS)."""
    if env := os.environ.get("SDTRT_NUM_THREADS"):
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "onnxruntime is not installed: pip install 'sdtrt[cpu]' (or 'sdtrt[gpu]' for CUDA)"
        ) from None
    return onnxruntime


def ort_tensor_specs(args: Sequence) -> dict[str, TensorSpec]:
    """TensorSpecs of an ONNX Runtime session's inputs or outputs (dynamic dims by name)."""
    return {
        a.name: TensorSpec(a.name, _ORT_TYPES[a.type], tuple(d if isinstance(d, int) else str(d) for d in a.shape))
        for a in args
    }


class OrtCpuSession:
    """One ONNX model on ONNX Runtime's CPU execution provider."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        ort = import_onnxruntime()
        self.name = Path(path).name
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_cpu_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.inputs = ort_tensor_specs(self._session.get_inputs())
        self.outputs = ort_tensor_specs(self._session.get_outputs())
        log.debug("loaded %s on ORT CPU with %d threads", self.name, options.intra_op_num_threads)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        results = self._session.run(list(self.outputs), dict(feeds))
        return dict(zip(self.outputs, results, strict=True))

    def close(self) -> None:
        self._session = None
