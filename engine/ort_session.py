"""ONNX Runtime sessions on the CPU."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sdtrt.engine.errors import BackendUnavailableError, InvalidInputError
from sdtrt.engine.lora_branch import DOWN, UP, check_factors, factor_feeds
from sdtrt.engine.ort_lora import EXTERNAL_FOLDER, branched_graph
from sdtrt.engine.session import TensorSpec, check_feeds
from sdtrt.engine.weights import WeightMap

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


ENV_THREADS = "SDTRT_NUM_THREADS"


def default_cpu_threads() -> int:
    """Cores this process may use (respects affinity masks and SDTRT_NUM_THREADS)."""
    if env := os.environ.get(ENV_THREADS, "").strip():
        if not env.isdecimal() or int(env) < 1:
            raise InvalidInputError(f"{ENV_THREADS} must be an integer >= 1 (the CPU threads to use), got {env!r}")
        return int(env)
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


def check_weights(weight_map: WeightMap | None, weights: Mapping[str, np.ndarray], owner: str) -> None:
    """One clear error unless ``weights`` are changeable initializers of the file with this weight map."""
    if not weights:
        return
    if weight_map is None:
        raise InvalidInputError(f"{owner} has no weight map: its weights cannot be changed")
    weight_map.check(weights, owner)


def replace_initializers(options, weights: Mapping[str, np.ndarray]) -> None:
    """Make a session opened with ``options`` load these values in place of the named initializers.

    ONNX Runtime's external initializers: they replace initializers stored as external data (the
    export keeps the weight-mapped ones there) when the model loads, before any graph optimization
    — unlike add_initializer, whose values the CPU provider's convolution layout transform never
    sees. ONNX Runtime copies them: nothing is written to disk, nothing must outlive the call.
    """
    if weights:
        ort = import_onnxruntime()
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)) for array in weights.values()]
        options.add_external_initializers(list(weights), values)


class OrtCpuSession:
    """One ONNX model on ONNX Runtime's CPU execution provider.

    With ``weight_map`` (the file's engine/weights.py map), set_weights opens a new session of the
    same file whose initializers the given arrays replace: no re-export, nothing written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        threads: int | None = None,
        weight_map: WeightMap | None = None,
    ) -> None:
        self.name = Path(path).name
        self._path = str(path)
        self._threads = threads or default_cpu_threads()
        self._weight_map = weight_map
        self._replaced = False  # whether some initializers hold other values than the file's
        # LoRA: the graph with low-rank branches (engine/ort_lora.py) where the file has a weight map
        branched = None if weight_map is None else branched_graph(Path(path), weight_map)
        self._graph, self._transposed = branched or (None, {})
        self.branched = frozenset(self._transposed)
        self._session = self._create({})
        self._factors = self._factor_feeds({})
        self.inputs = {
            name: spec
            for name, spec in ort_tensor_specs(self._session.get_inputs()).items()
            if not name.startswith((DOWN, UP))
        }
        self.outputs = ort_tensor_specs(self._session.get_outputs())
        log.debug("loaded %s on ORT CPU with %d threads", self.name, self._threads)

    def _create(self, weights: Mapping[str, np.ndarray]):
        """A new InferenceSession of the file with ``weights`` replacing initializers."""
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # fatal only: an error reaches the caller as an exception (a file that cannot load: open_session
        # makes it one line), not also as a log line on stderr
        options.log_severity_level = 4
        replace_initializers(options, weights)
        if self._graph is not None:  # the weights lie beside the file itself (a linked file's: beside its target)
            options.add_session_config_entry(EXTERNAL_FOLDER, str(Path(self._path).resolve().parent))
        model = self._path if self._graph is None else self._graph
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        results = self._session.run(list(self.outputs), {**feeds, **self._factors})
        return dict(zip(self.outputs, results, strict=True))

    def set_factors(self, factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Feed these LoRA factors to the branches from now on (engine/session.py LowRankSession): no new session."""
        check_factors(self.branched, self._weight_map, factors, self.name)
        self._factors = self._factor_feeds(factors)

    def _factor_feeds(self, factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """factor_feeds' arrays, transposed where the branch is a MatMul's (x @ down.T @ up.T)."""
        if not self.branched:
            return {}
        feeds = factor_feeds(self.branched, self._weight_map, factors)
        return {
            name: np.ascontiguousarray(array.T) if self._transposed[name.partition(":")[2]] else array
            for name, array in feeds.items()
        }

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        check_weights(self._weight_map, weights, self.name)
        if not weights and not self._replaced:
            return  # the base weights already
        self._session = self._create(weights)
        self._replaced = bool(weights)
        log.debug("%s: new ORT CPU session with %d changed weights", self.name, len(weights))

    def close(self) -> None:
        self._session = None
