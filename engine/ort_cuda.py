"""ONNX Runtime on the GPU: the CUDA execution provider, IOBinding on fixed device buffers, CUDA graphs.

Each distinct set of input shapes gets its own device buffers (OrtValues on "cuda") and its own
CUDA graph id. The first call with a shape runs eagerly (graph id -1) with outputs that ONNX
Runtime allocates, which gives the output shapes; fixed output buffers are then bound in their
place. From the second call on, the run carries the shape's graph id: ONNX Runtime captures a graph
for that id on its first run and replays it afterwards. ONNX Runtime does not check that an id
keeps its shapes; the key -> id map here guarantees it. Per call only the inputs go to the device
and the outputs come back, which is all the NumPy scheduler needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.engine.errors import BackendUnavailableError
from sdtrt.engine.ort_session import check_weights, import_onnxruntime, ort_tensor_specs, replace_initializers
from sdtrt.engine.session import check_feeds

log = logging.getLogger(__name__)

EAGER = -1  # the gpu_graph_id that runs without capturing or replaying


@dataclass
class _Binding:
    """The fixed buffers of one set of input shapes and the graph id they run under."""

    iobinding: Any  # onnxruntime.IOBinding
    inputs: dict[str, Any]  # name -> OrtValue on the device
    outputs: dict[str, Any]
    run_options: Any  # onnxruntime.RunOptions carrying gpu_graph_id
    graph_id: int


class OrtCudaSession:
    """One ONNX model on ONNX Runtime's CUDA execution provider.

    ``cuda_graph`` turns on ONNX Runtime's CUDA graphs (a model it cannot capture runs without, with
    a warning). ``device="cpu"`` runs the same IOBinding path on the CPU provider, without graphs:
    it lets machines without a GPU exercise this class. With ``weight_map`` (the file's
    engine/weights.py map), set_weights opens a new session whose initializers the given arrays
    replace; its buffers and graphs start afresh.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device_id: int = 0,
        cuda_graph: bool = True,
        device: str = "cuda",
        weight_map: str | os.PathLike[str] | None = None,
    ) -> None:
        self._ort = ort = import_onnxruntime()
        self.name = Path(path).name
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")
        self._path, self._device, self._device_id, self._weight_map = path, device, device_id, weight_map
        self._replaced = False  # whether some initializers hold other values than the file's
        self.cuda_graph = cuda_graph and device == "cuda"
        self._session = self._open({})
        self.inputs = ort_tensor_specs(self._session.get_inputs())
        self.outputs = ort_tensor_specs(self._session.get_outputs())
        self._bindings: dict[tuple, _Binding] = {}
        self._eager_options = ort.RunOptions()
        self._eager_options.add_run_config_entry("gpu_graph_id", str(EAGER))
        log.debug("loaded %s on ORT %s (CUDA graphs %s)", self.name, device, "on" if self.cuda_graph else "off")

    def _open(self, weights: Mapping[str, np.ndarray]):
        """A new InferenceSession of the file on this device with ``weights`` replacing initializers."""
        if self._device == "cpu":
            return self._create(["CPUExecutionProvider"], weights)

        def provider(graph: bool) -> list:
            options = {"device_id": str(self._device_id), "enable_cuda_graph": str(int(graph))}
            return [("CUDAExecutionProvider", options)]

        try:
            session = self._create(provider(self.cuda_graph), weights)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
            if not self.cuda_graph:
                raise
            log.warning("%s: ONNX Runtime cannot capture CUDA graphs of it, running without: %s", self.name, exc)
            session, self.cuda_graph = self._create(provider(False), weights), False
        if "CUDAExecutionProvider" not in session.get_providers():
            raise BackendUnavailableError(
                f"ONNX Runtime could not start its CUDA provider for {self.name} (are the CUDA and cuDNN "
                "libraries that onnxruntime-gpu needs installed?); the CPU backend is ort-cpu"
            )
        return session

    def _create(self, providers: list, weights: Mapping[str, np.ndarray]):
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        replace_initializers(options, weights)
        return ort.InferenceSession(str(self._path), sess_options=options, providers=providers)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        check_weights(self._weight_map, weights, self.name)
        if not weights and not self._replaced:
            return  # the base weights already
        session = self._open(weights)
        self._bindings.clear()  # the old session's buffers and CUDA graphs
        self._session, self._replaced = session, bool(weights)
        log.debug("%s: new ORT %s session with %d changed weights", self.name, self._device, len(weights))

    @property
    def graph_ids(self) -> dict[tuple, int]:
        """Input shapes -> the CUDA graph id they run under (EAGER without graphs)."""
        return {key: b.graph_id for key, b in self._bindings.items()}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        key = tuple(tuple(feeds[n].shape) for n in self.inputs)
        binding = self._bindings.get(key)
        if binding is None:
            return self._first_run(key, feeds)
        for n, value in binding.inputs.items():
            value.update_inplace(np.ascontiguousarray(feeds[n]))
        self._session.run_with_iobinding(binding.iobinding, binding.run_options)
        return {n: np.array(value.numpy()) for n, value in binding.outputs.items()}  # copies the caller owns

    def _first_run(self, key: tuple, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a new set of shapes eagerly, then fix its buffers and give it a graph id."""
        ort, device, device_id = self._ort, self._device, self._device_id
        iobinding = self._session.io_binding()
        inputs = {}
        for (n, spec), shape in zip(self.inputs.items(), key, strict=True):
            inputs[n] = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), _np_type(spec.dtype), device, device_id)
            inputs[n].update_inplace(np.ascontiguousarray(feeds[n]))
            iobinding.bind_ortvalue_input(n, inputs[n])
        for n in self.outputs:
            iobinding.bind_output(n, device, device_id)
        self._session.run_with_iobinding(iobinding, self._eager_options)
        produced = dict(zip(self.outputs, iobinding.get_outputs(), strict=True))
        results = {n: np.array(value.numpy()) for n, value in produced.items()}

        outputs = {}
        for n, value in produced.items():
            dtype = _np_type(self.outputs[n].dtype)
            outputs[n] = ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), dtype, device, device_id)
            iobinding.bind_ortvalue_output(n, outputs[n])
        graph_id = len(self._bindings) + 1 if self.cuda_graph else EAGER  # 0 is ONNX Runtime's own default
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self._bindings[key] = _Binding(iobinding, inputs, outputs, run_options, graph_id)
        return results

    def close(self) -> None:
        self._bindings.clear()
        self._session = None


def _np_type(dtype: str) -> type:
    return np.dtype(dtype).type
