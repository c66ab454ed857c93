"""ONNX Runtime on the GPU: the CUDA execution provider, IOBinding on fixed device buffers, CUDA graphs.

Each distinct set of input shapes gets its own device buffers (OrtValues on "cuda") and its own
graph id. ONNX Runtime captures a CUDA graph only of a session whose every node runs on the CUDA
provider, and with dynamic dims it keeps the shape arithmetic (Shape, Gather, Concat, ...) on the
CPU. So with graphs on, each set of shapes gets a session of its own with those dims pinned
(free-dimension overrides): the shape arithmetic folds away. Its first call runs that session
eagerly, with outputs that ONNX Runtime allocates, which gives the output shapes; fixed output
buffers are then bound in their place, and two more runs — ONNX Runtime's warm-up run, then its
capture — make every later call a replay. The dynamic-shape session that the constructor opens (to
read the inputs and outputs) is closed before the first pinned one opens: no dynamic twin holds a
second copy of the weights in device memory, not even while loading. Each pinned session holds its
own copy, so each further shape costs the network's weights once more. Without graphs, the one
dynamic session serves every shape. Per call only the inputs go to the device and the outputs come
back, which is all the NumPy scheduler needs.

The CUDA provider's options (convolution algorithm search and workspace, NHWC, the attention kernel,
the memory arena's growth) are CudaProviderOptions, overridable with SDTRT_ORT_CUDA_OPTIONS.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.engine.errors import BackendUnavailableError, InvalidInputError
from sdtrt.engine.ort_session import check_weights, import_onnxruntime, ort_tensor_specs, replace_initializers
from sdtrt.engine.session import check_feeds
from sdtrt.engine.weights import WeightMap

log = logging.getLogger(__name__)

EAGER = -1  # the gpu_graph_id that runs without capturing or replaying
OPTIONS_ENV = "SDTRT_ORT_CUDA_OPTIONS"
CONV_ALGO_SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
ARENA_STRATEGIES = ("kSameAsRequested", "kNextPowerOfTwo")


@dataclass(frozen=True)
class CudaProviderOptions:
    """The CUDA provider options sdtrt sets, by ONNX Runtime's names.

    The defaults are ONNX Runtime's own but the arena's growth (ORT's Stable Diffusion demo's choice:
    by what is asked, not to the next power of two); benchmarks/gpu_check.sh measures the others.
    ``SDTRT_ORT_CUDA_OPTIONS="prefer_nhwc=1,sdpa_kernel=8"`` overrides any of them.
    """

    cudnn_conv_algo_search: str = "EXHAUSTIVE"  # EXHAUSTIVE | HEURISTIC | DEFAULT
    cudnn_conv_use_max_workspace: bool = True  # let cuDNN take the workspace its fastest algorithm wants
    prefer_nhwc: bool = False  # run convolutions channels-last (the fused graphs' NhwcConv already are)
    # MultiHeadAttention's kernels, a bitmask: 0 ONNX Runtime's choice, 1 flash, 2 memory-efficient,
    # 4 TensorRT fused, 8 cuDNN flash, 16 unfused
    sdpa_kernel: int = 0
    arena_extend_strategy: str = "kSameAsRequested"

    def __post_init__(self) -> None:
        if self.cudnn_conv_algo_search not in CONV_ALGO_SEARCHES:
            raise InvalidInputError(f"cudnn_conv_algo_search must be one of {', '.join(CONV_ALGO_SEARCHES)}")
        if self.arena_extend_strategy not in ARENA_STRATEGIES:
            raise InvalidInputError(f"arena_extend_strategy must be one of {', '.join(ARENA_STRATEGIES)}")
        if not 0 <= self.sdpa_kernel < 256:
            raise InvalidInputError(f"sdpa_kernel is a bitmask from 0 to 255, not {self.sdpa_kernel}")

    def provider_options(self, device_id: int, cuda_graph: bool) -> dict[str, str]:
        """The CUDA provider's options as ONNX Runtime takes them (strings)."""
        options = {"device_id": str(device_id), "enable_cuda_graph": str(int(cuda_graph))}
        for field in fields(self):
            value = getattr(self, field.name)
            options[field.name] = str(int(value)) if isinstance(value, bool | int) else value
        return options

    @classmethod
    def parse(cls, text: str) -> CudaProviderOptions:
        """Options from "name=value,..." (booleans as 0/1); anything else is one clear error."""
        known = {field.name: field.type for field in fields(cls)}
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            if name not in known or not value:
                raise InvalidInputError(
                    f"{OPTIONS_ENV}: {item!r} is not name=value with a name from {', '.join(known)}"
                )
            if known[name] == "str":
                values[name] = value
                continue
            try:
                number = int(value)
            except ValueError:
                raise InvalidInputError(f"{OPTIONS_ENV}: {name} takes an integer, not {value!r}") from None
            if known[name] == "bool" and number not in (0, 1):
                raise InvalidInputError(f"{OPTIONS_ENV}: {name} is 0 or 1, not {value!r}")
            values[name] = bool(number) if known[name] == "bool" else number
        return replace(cls(), **values)

    @classmethod
    def from_env(cls) -> CudaProviderOptions:
        return cls.parse(os.environ.get(OPTIONS_ENV, ""))


@dataclass
class _Binding:
    """The fixed buffers of one set of input shapes, the session and the graph id they run under."""

    session: Any  # onnxruntime.InferenceSession: the dynamic one, or one with these shapes pinned
    iobinding: Any  # onnxruntime.IOBinding
    inputs: dict[str, Any]  # name -> OrtValue on the device
    outputs: dict[str, Any]
    run_options: Any  # onnxruntime.RunOptions carrying gpu_graph_id
    graph_id: int


class OrtCudaSession:
    """One ONNX model on ONNX Runtime's CUDA execution provider.

    ``cuda_graph`` turns on CUDA graphs, one per set of input shapes on a session with those shapes
    pinned (a model ONNX Runtime cannot capture runs without, with a warning). ``device="cpu"`` runs
    the same IOBinding path on the CPU provider, without graphs: it lets machines without a GPU
    exercise this class. With ``weight_map`` (the file's engine/weights.py map), set_weights opens
    new sessions whose initializers the given arrays replace; their buffers and graphs start afresh
    (with graphs on, each shape's pinned session is reopened on its next call). ``options``: the CUDA
    provider's (default: CudaProviderOptions.from_env()).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device_id: int = 0,
        cuda_graph: bool = True,
        device: str = "cuda",
        weight_map: WeightMap | None = None,
        options: CudaProviderOptions | None = None,
    ) -> None:
        self.options = options or CudaProviderOptions.from_env()
        self._ort = ort = import_onnxruntime()
        self.name = Path(path).name
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")
        self._path, self._device, self._device_id, self._weight_map = path, device, device_id, weight_map
        self._weights: Mapping[str, np.ndarray] = {}  # the initializers that hold other values than the file's
        self.cuda_graph = cuda_graph and device == "cuda"
        self._session = self._open()
        self.inputs = ort_tensor_specs(self._session.get_inputs())
        self.outputs = ort_tensor_specs(self._session.get_outputs())
        self._bindings: dict[tuple, _Binding] = {}
        self._eager_options = ort.RunOptions()
        self._eager_options.add_run_config_entry("gpu_graph_id", str(EAGER))
        log.debug("loaded %s on ORT %s (CUDA graphs %s)", self.name, device, "on" if self.cuda_graph else "off")

    def _open(self, pinned: Mapping[str, int] | None = None):
        """A new InferenceSession of the file on this device with the current weights.

        ``pinned`` (dim name -> size) fixes the dynamic dims and turns CUDA graphs on.
        """
        if self._device == "cpu":
            return self._create(["CPUExecutionProvider"], {})
        options = self.options.provider_options(self._device_id, cuda_graph=pinned is not None)
        session = self._create([("CUDAExecutionProvider", options)], pinned or {})
        if "CUDAExecutionProvider" not in session.get_providers():
            raise BackendUnavailableError(
                f"ONNX Runtime could not start its CUDA provider for {self.name} (are the CUDA and cuDNN "
                "libraries that onnxruntime-gpu needs installed?); the CPU backend is ort-cpu"
            )
        return session

    def _create(self, providers: list, pinned: Mapping[str, int]):
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        for dim, size in pinned.items():
            options.add_free_dimension_override_by_name(dim, size)
        replace_initializers(options, self._weights)
        return ort.InferenceSession(str(self._path), sess_options=options, providers=providers)

    def _graph_session(self, key: tuple):
        """A session with the dims of these input shapes pinned and CUDA graphs on, or None where ORT refuses."""
        pinned = {
            dim: size
            for spec, shape in zip(self.inputs.values(), key, strict=True)
            for dim, size in zip(spec.shape, shape, strict=True)
            if isinstance(dim, str)
        }
        try:
            return self._open(pinned)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
            log.warning("%s: ONNX Runtime cannot capture CUDA graphs of it, running without: %s", self.name, exc)
            self.cuda_graph = False
            return None

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        check_weights(self._weight_map, weights, self.name)
        if not weights and not self._weights:
            return  # the base weights already
        previous, self._weights = self._weights, weights
        self._bindings.clear()  # the old sessions' buffers and CUDA graphs
        self._session = None
        if self.cuda_graph:  # each shape's pinned session opens with these weights on its next call
            return
        try:
            self._session = self._open()
        except Exception:
            self._weights = previous
            self._session = self._open()
            raise
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
        binding.session.run_with_iobinding(binding.iobinding, binding.run_options)
        return {n: np.array(value.numpy()) for n, value in binding.outputs.items()}  # copies the caller owns

    def _first_run(self, key: tuple, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a new set of shapes eagerly on the session that will run them, then fix its buffers there."""
        ort, device, device_id = self._ort, self._device, self._device_id
        session = None
        if self.cuda_graph:
            self._session = None  # the dynamic session goes first: device memory never holds it beside a pinned one
            session = self._graph_session(key)
        if session is None and self._session is None:  # no graphs (ORT refused them): one dynamic session
            self._session = self._open()
        graph_id = len(self._bindings) + 1 if session is not None else EAGER  # 0 is ONNX Runtime's own default
        session = session or self._session
        iobinding = session.io_binding()
        for n in self.inputs:
            iobinding.bind_cpu_input(n, np.ascontiguousarray(feeds[n]))
        for n in self.outputs:
            iobinding.bind_output(n, device, device_id)
        session.run_with_iobinding(iobinding, self._eager_options)
        produced = dict(zip(self.outputs, iobinding.get_outputs(), strict=True))
        results = {n: np.array(value.numpy()) for n, value in produced.items()}

        iobinding = session.io_binding()
        inputs, outputs = {}, {}
        for (n, spec), shape in zip(self.inputs.items(), key, strict=True):
            inputs[n] = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), _np_type(spec.dtype), device, device_id)
            inputs[n].update_inplace(np.ascontiguousarray(feeds[n]))
            iobinding.bind_ortvalue_input(n, inputs[n])
        for n, value in produced.items():
            dtype = _np_type(self.outputs[n].dtype)
            outputs[n] = ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), dtype, device, device_id)
            iobinding.bind_ortvalue_output(n, outputs[n])
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self._bindings[key] = _Binding(session, iobinding, inputs, outputs, run_options, graph_id)
        if graph_id != EAGER:
            for _ in range(2):  # ONNX Runtime's warm-up run (cuDNN's algorithm search), then its capture
                session.run_with_iobinding(iobinding, run_options)
        return results

    def close(self) -> None:
        self._bindings.clear()
        self._session = None


def _np_type(dtype: str) -> type:
    return np.dtype(dtype).type
