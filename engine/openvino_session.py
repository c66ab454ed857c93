"""OpenVINO sessions on the CPU: our ONNX export compiled per input shape, in bf16 where the CPU has it.

Each new set of input shapes reads the model, pins its dynamic dimensions to those shapes and
compiles it for the CPU plugin at the chosen inference precision ("bf16" runs the matrix work in
bfloat16 on CPUs with native bf16 instructions; "fp32" matches ONNX Runtime's fp32 within
rounding). Under bf16 the model is read from an IR with fp16 weights made once from the ONNX file
(engine/openvino_ir.py; no change to the arithmetic). The compiled model holds its own copy of the
weights and keeps the source mapped without reading it again, so the source's pages are given back
while and after it compiles (engine/pageout.py): what stays resident is the compiled copy alone.
OpenVINO's model cache (``cache_dir``) makes a second start load the compiled model instead of
compiling it again (base weights only: a LoRA's weights are compiled afresh).

LoRA: a model with a weight map is compiled with a low-rank branch beside each Linear and 1x1
convolution weight (engine/openvino_lora.py) from the first set_factors on (once, then kept: until an
adapter is handed over, the model compiles without branches and runs at the base model's speed);
set_factors feeds the adapters' factors to the same compiled models, nothing recompiles. The other
mapped weights (kxk convolutions) are constants of their own, named after their initializers; set_weights
replaces those in the models compiled next.
int8 ("int8"): a network `sdtrt quantize --int8` made an int8 IR of (export/quantize.py) compiles from
that IR, what it leaves in float at default_compute(); a network without one runs its ONNX file at
default_compute(). An int8 IR has no weight map: its weights are quantized (LoRA is refused upstream).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from sdtrt.engine.errors import BackendUnavailableError, InvalidInputError
from sdtrt.engine.fsutil import onnx_files
from sdtrt.engine.lora_branch import check_factors, factor_feeds
from sdtrt.engine.manifest import ComponentFile, Manifest
from sdtrt.engine.openvino_ir import discard, fp16_ir
from sdtrt.engine.openvino_lora import add_branches, branch_sites, named_weights
from sdtrt.engine.ort_session import check_weights, default_cpu_threads
from sdtrt.engine.pageout import paged_out
from sdtrt.engine.session import TensorSpec, check_feeds
from sdtrt.engine.weights import WeightMap

log = logging.getLogger(__name__)

OPENVINO_PRECISIONS = {"bf16": "bf16", "fp32": "f32"}  # ours -> OpenVINO's INFERENCE_PRECISION_HINT
INT8 = "int8"  # an int8 IR (`sdtrt quantize`): what it does not quantize runs at default_compute()
MAX_COMPILED_SHAPES = 2  # compiled models kept per network (each holds its own weights): least recently used go


def import_openvino() -> ModuleType:
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError("openvino is not installed: pip install 'sdtrt[cpu]'") from None
    return openvino


def native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX-512 BF16 or AMX)."""
    return "BF16" in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def default_compute() -> str:
    """bf16 where the CPU has native bf16, else fp32."""
    return "bf16" if native_bf16() else "fp32"


def openvino_file(manifest: Manifest, component: str, onnx: ComponentFile, compute: str) -> tuple[ComponentFile, str]:
    """The file the openvino backend compiles for ``component`` and its precision: under int8 the component's
    int8 IR where the export has one, else (the VAE, a ControlNet) the ONNX file at default_compute()."""
    if compute != INT8:
        return onnx, compute
    if (ir := manifest.components[component].openvino.get(INT8)) is not None:
        return ir, INT8
    log.info(
        "%s has no int8 IR (sdtrt quantize makes the UNet's and text encoders'): it runs at %s",
        component,
        default_compute(),
    )
    return onnx, default_compute()


class OpenVinoSession:
    """One ONNX model on OpenVINO's CPU plugin, compiled once per input shape."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        precision: str = "fp32",
        threads: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        weight_map: WeightMap | None = None,
        digest: str | None = None,
        lora_rank: int | None = None,
    ) -> None:
        if precision not in (*OPENVINO_PRECISIONS, INT8):
            raise InvalidInputError(
                f"unknown OpenVINO precision {precision!r} (choose from {', '.join((*OPENVINO_PRECISIONS, INT8))})"
            )
        ov = import_openvino()
        self.name = Path(path).name
        self.precision = precision
        self._weight_map = weight_map
        self._weights: Mapping[str, np.ndarray] = {}  # constants that hold other values than the file's
        self._core = ov.Core()
        self._config = {
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISIONS[default_compute() if precision == INT8 else precision],
            "INFERENCE_NUM_THREADS": threads or default_cpu_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }
        # one cache folder per precision: OpenVINO 2026.4 loads a model compiled at f32 for a bf16 request
        # from a shared one (its key misses the precision), which then computes NaN
        self._cache_dir = None if cache_dir is None else Path(cache_dir) / precision
        self._compiled: dict[tuple, object] = {}  # input shapes -> infer request, most recently used last
        self._lock = threading.Lock()  # one infer request per shape: one call at a time
        # Read the ONNX file now, so that a file OpenVINO cannot load fails here (open_session makes its
        # RuntimeError one line), not at the first step; the model's own names are the session's inputs and
        # outputs (open_session checks them against the manifest's). What the first compile reads is decided
        # then (a load that fails leaves no IR behind).
        self._onnx = Path(path)
        self._ir_home = (digest, Path(cache_dir)) if precision == "bf16" and cache_dir and digest else None
        self._source: Path | None = None  # what compiles read, once the first one chose it
        self._unread = self._core.read_model(str(self._onnx))
        self.inputs = _port_specs(self._unread.inputs, inputs)
        self.outputs = _port_specs(self._unread.outputs, outputs)
        # the weights whose LoRA is a branch fed at run time, compiled in by the first set_factors
        self.branched = frozenset() if weight_map is None else frozenset(branch_sites(self._unread, weight_map))
        self.lora_rank = lora_rank  # None: branches of dynamic rank; else static, the adapters' ranks padded to it
        self._factors: dict[str, np.ndarray] = {}  # the branches' inputs: none until the first set_factors adds them
        log.debug("opened %s on OpenVINO %s (%s)", self.name, ov.__version__, precision)

    def _read(self):
        """The model to compile: under bf16, read from the IR with fp16 weights in the cache folder (made on
        the first compile), else the ONNX file (the one read at opening, on the first compile)."""
        if self._source is None:
            self._source = self._onnx if self._ir_home is None else fp16_ir(self._onnx, *self._ir_home) or self._onnx
            log.debug("%s: compiling from %s", self.name, self._source)
        model, self._unread = self._unread, None
        if model is not None and self._source == self._onnx:
            return model
        try:
            return self._core.read_model(str(self._source))
        except RuntimeError as exc:
            if self._source == self._onnx:
                raise
            why = " ".join(str(exc).split())[-300:]  # OpenVINO's message: many lines, the reason last
            log.warning("%s: the IR in %s is damaged (%s): compiling from the ONNX file", self.name, self._source, why)
            discard(self._source.parent)  # a cache: a damaged entry is rebuilt, never served
            self._source = self._onnx
            return self._core.read_model(str(self._onnx))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        key = tuple(feeds[name].shape for name in self.inputs)
        with self._lock:
            request = self._request(key)
            results = request.infer(
                {**{name: np.ascontiguousarray(feeds[name]) for name in self.inputs}, **self._factors}
            )
            # every name of each output tensor: a compiled model may merge an output with a tensor of another name
            outputs = {name: value for port, value in results.items() for name in port.get_names()}
            return {name: np.array(outputs[name], dtype=self.outputs[name].dtype) for name in self.outputs}

    def _request(self, key: tuple):
        """The infer request compiled for these input shapes (compiled on first use)."""
        if key in self._compiled:
            self._compiled[key] = self._compiled.pop(key)  # most recently used
            return self._compiled[key]
        while len(self._compiled) >= MAX_COMPILED_SHAPES:
            del self._compiled[next(iter(self._compiled))]
        model = self._read()
        if self._weights:
            _replace_constants(model, self._weights)
        if self._factors and add_branches(model, self._weight_map, self.lora_rank) != self.branched:
            raise BackendUnavailableError(
                f"{self.name}: {self._source} differs from the ONNX file: delete {self._source.parent}"
            )
        if self.precision == "bf16" and (self._source == self._onnx or self._weights):  # the IR's are fp16 already
            _compress_to_fp16(model)
        model.reshape({name: list(shape) for name, shape in zip(self.inputs, key, strict=True)})
        config = dict(self._config)
        if self._cache_dir is not None and not self._weights:  # LoRA variants are not cached: each is a model
            config["CACHE_DIR"] = str(self._cache_dir)
        weights = [self._source.parent] if self._source.suffix == ".xml" else onnx_files(self._source)
        try:
            with paged_out([*weights, *([self._cache_dir] if "CACHE_DIR" in config else [])]):
                compiled = self._core.compile_model(model, "CPU", config)
        except RuntimeError as exc:  # OpenVINO's own errors: out of memory, an unsupported shape
            raise BackendUnavailableError(f"OpenVINO could not compile {self.name} for shapes {key}: {exc}") from None
        log.debug("%s: compiled for %s at %s", self.name, key, self.precision)
        self._compiled[key] = compiled.create_infer_request()
        return self._compiled[key]

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        check_weights(self._weight_map, weights, self.name)
        if not weights and not self._weights:
            return  # the base weights already
        with self._lock:
            self._weights = dict(weights)
            self._compiled.clear()  # compiled with the old weights: recompiled on next use
        log.debug("%s: %d weights changed, recompiling on next use", self.name, len(weights))

    def set_factors(self, factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Feed these LoRA factors (initializer -> (down (rank, in), up (out, rank)) float32, scales folded into
        ``up``) to the branches from now on, rank 0 to every other branch: no recompile, but for the first call,
        which compiles the branches in (on next use)."""
        check_factors(self.branched, self._weight_map, factors, self.name, self.lora_rank)
        if not self.branched:
            return
        feeds = factor_feeds(self.branched, self._weight_map, factors, self.lora_rank)
        with self._lock:
            if not self._factors:
                self._compiled.clear()  # compiled without branches: recompiled with them on next use
                log.debug("%s: low-rank branches beside %d weights from now on", self.name, len(self.branched))
            self._factors = feeds

    def close(self) -> None:
        with self._lock:
            self._compiled.clear()


def _port_specs(ports: Sequence, declared: Sequence[TensorSpec]) -> dict[str, TensorSpec]:
    """A model's inputs or outputs by its own names: the declared spec of each (with its named dimensions),
    else one read from the port."""
    by_name = {spec.name: spec for spec in declared}
    specs = {}
    for port in ports:
        name = port.get_any_name()
        shape = tuple(d.get_length() if d.is_static else "?" for d in port.get_partial_shape())
        specs[name] = by_name.get(name) or TensorSpec(name, np.dtype(port.get_element_type().to_dtype()).name, shape)
    return specs


def _compress_to_fp16(model) -> None:
    """Store the model's fp32 constants (read from an ONNX file, or a LoRA's) as fp16 before a bf16 compile:
    the compiled model keeps its source constants beside its own bf16 copy, and those in memory cannot be
    given back, so fp16 ones halve them. bf16 keeps fewer mantissa bits than fp16, so the arithmetic is not
    changed by it. OpenVINO's own
    transformation (what save_model(compress_to_fp16=True) runs); skipped where a release lacks it."""
    try:
        from openvino._offline_transformations import compress_model_transformation
    except ImportError:
        log.debug("this OpenVINO has no compress_model_transformation: fp32 constants kept")
        return
    compress_model_transformation(model)


def _replace_constants(model, weights: Mapping[str, np.ndarray]) -> None:
    """Give the model's constants named after these initializers the new values (read from the fp16 IR, the
    name is on the Convert that decompresses the constant: its output is what gets replaced)."""
    from openvino import opset13

    nodes = named_weights(model)
    if missing := sorted(set(weights) - set(nodes)):
        raise InvalidInputError(f"OpenVINO names no constant {', '.join(missing[:3])}: re-export the model")
    for name, array in weights.items():
        new = opset13.constant(np.ascontiguousarray(array))
        new.set_friendly_name(name)
        nodes[name].output(0).replace(new.output(0))
