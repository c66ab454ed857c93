"""ONNX Runtime's fused graphs of a network, written beside the plain export for the ORT backends.

The plain ONNX stays as it is (TensorRT parses it and fuses on its own). ONNX Runtime does not fuse
attention or GroupNorm by itself: its transformers optimizer (``optimize_model`` with the unet / vae
model types) rewrites the plain fp32 graph into its contrib ops — MultiHeadAttention (flash,
memory-efficient and cuDNN kernels on CUDA), NhwcConv, channels-last GroupNorm / SkipGroupNorm,
BiasSplitGelu, BiasAdd, packed QKV / KV, SkipLayerNormalization. Two targets:

- ``gpu``: every fusion, then fp16 — for ONNX Runtime's CUDA provider;
- ``cpu``: fp32, only the fusions the CPU provider has kernels for (MultiHeadAttention, Attention,
  SkipLayerNormalization, LayerNormalization, Gelu); it computes what the plain export does.

What it takes, and why:

- The fused graph is derived from the plain fp32 export itself (its SDPA attention pattern), so it
  holds the same weights and no second trace runs. What kept ORT from fusing that pattern is NumPy
  2.4: ORT 1.32's head-count detection (fusion_attention_unet.get_num_heads, and the VAE's) calls
  ``int()`` on a 1-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted
  to Python scalars"). Passing ``num_heads`` does not help (the detection runs first, and SDXL's head
  counts differ per block anyway); while fusing, the constants ORT reads come back as arrays that
  ``int()`` accepts, as before NumPy 2.4 (``_int_convertible_constants``). The classic AttnProcessor
  trace, which ORT's own tools export, is not needed: the SDPA pattern fuses every attention layer.
- Fusion runs on fp32 (ORT's patterns do not match an fp16 graph), then fp16 conversion.
- Memory: the graph is fused with its weights left in the data file (``load_external_data=False``);
  the few values a fusion reads (head counts, the Q/K/V weights it packs, the convolution weights
  NhwcConv transposes) are read from the data file on demand, relative to the working directory,
  which is the data file's folder while fusing. Only then are the weights read, once (the fp16
  conversion replaces each tensor in place), and written to the data file tensor by tensor. Measured
  on the SD-1.5-shaped UNet (3.4 GB of fp32 weights): peak RSS 3.9 GiB for the cpu target, 5.6 GiB for
  the gpu one (ORT's own path: ~14 GiB). An SDXL UNet, 3x the weights, needs about 3x that: ~17 GiB.
- Every attention layer of the graph (one Softmax each before fusion) must become one MultiHeadAttention
  (or Attention) node; where some do not, the report says how many fused out of how many, and those
  unfused islands are kept in fp32 on networks whose attention overflows in fp16 (``upcast_attention``).

Which networks: the UNet (both targets), and where ControlNets are attached (export/controlnet.py) the UNet
that takes their residuals and each ControlNet, which the optimizer fuses as UNets; the VAE halves (gpu
only, and without their attention: ORT 1.32's VAE attention fusion writes zeros for the q/k/v biases —
fusion_attention_vae's create_attention_node, "No bias, use zeros" — while diffusers' VAE attention has
them, so the fused layer differs from the model by 1e-2 to 6e-2 relative on the tiny VAE; GroupNorm,
SkipGroupNorm and NhwcConv fuse, and the CPU has none of those kernels). The text encoders are not fused:
ORT's clip pattern finds none of the attention layers of transformers 5's CLIP export (0 of 2 on the tiny
model, eager or SDPA), and they run once per request.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from sdtrt.engine.errors import ExportError
from sdtrt.engine.network_facts import NETWORK_FACTS, is_known_network
from sdtrt.export.onnx_export import save_onnx
from sdtrt.export.wrappers import NetworkSpec

log = logging.getLogger(__name__)

TARGETS = ("gpu", "cpu")
# network (its NETWORK_FACTS record: "controlnet" for every attached ControlNet) -> ORT's optimizer model type;
# a ControlNet and the UNet that takes its residuals are UNet graphs to the optimizer
UNETS = ("unet", "unet_controlnet", "controlnet")
MODEL_TYPES = {**dict.fromkeys(UNETS, "unet"), "vae_decoder": "vae", "vae_encoder": "vae"}
CPU_FUSED = UNETS  # the networks whose cpu target is written (see above)
ATTENTION_FUSED = UNETS  # whose attention ORT fuses correctly (not the VAE's: see above)
ATTENTION_OPS = ("MultiHeadAttention", "Attention")  # self-attention with unpacked QKV becomes Attention
# fusions whose ops only the CUDA provider runs (the CPU provider has no kernel for them)
CUDA_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_bias_add",
    "enable_packed_qkv",
    "enable_packed_kv",
)
COUNTED_OPS = (
    *ATTENTION_OPS,
    "SkipLayerNormalization",
    "LayerNormalization",
    "GroupNorm",
    "SkipGroupNorm",
    "NhwcConv",
    "BiasSplitGelu",
    "BiasAdd",
    "Gelu",
    "BiasGelu",
)


@dataclass(frozen=True)
class FusionReport:
    """What the optimizer made of one network for one target."""

    network: str
    target: str  # "gpu" | "cpu"
    attention_layers: int  # in the graph before fusion: one Softmax each
    ops: dict[str, int]  # fused op type -> nodes after fusion (COUNTED_OPS)
    attention_asked: bool = True  # whether attention fusion ran (not on the VAE: see the module docstring)

    @property
    def fused_attention(self) -> int:
        return sum(self.ops.get(op, 0) for op in ATTENTION_OPS)

    @property
    def complete(self) -> bool:
        """Whether every attention layer became one fused node, where attention fusion ran."""
        return not self.attention_asked or self.fused_attention == self.attention_layers

    def summary(self) -> str:
        ops = ", ".join(f"{op} {n}" for op, n in self.ops.items() if n)
        attention = f"{self.fused_attention}/{self.attention_layers}" + ("" if self.attention_asked else " (not asked)")
        return f"{self.network} ({self.target}): attention fused {attention}; {ops}"

    def to_dict(self) -> dict:
        return {
            "attention_layers": self.attention_layers,
            "fused_attention": self.fused_attention,
            "attention_asked": self.attention_asked,
            "ops": self.ops,
        }


def fuse(
    source: Path, spec: NetworkSpec, target: str, out_path: Path, *, upcast_attention: bool = False
) -> FusionReport:
    """Fuse the plain fp32 ONNX ``source`` of ``spec`` for ``target`` and write it to ``out_path``
    (fp16 for "gpu", fp32 for "cpu"); returns what fused. ``upcast_attention`` (SD 2.x UNets) keeps
    attention that did not fuse in fp32 in the fp16 graph."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    network = fused_kind(spec.name)
    if target not in TARGETS or network is None:
        raise ExportError(f"ONNX Runtime's {target!r} fusions are not for {spec.name} (targets: {TARGETS})")
    model_type = MODEL_TYPES[network]
    options = FusionOptions(model_type)
    options.enable_attention = network in ATTENTION_FUSED
    if target == "cpu":
        for fusion in CUDA_ONLY_FUSIONS:
            setattr(options, fusion, False)
    source = source.resolve()  # read below from inside its folder
    model = onnx.load(str(source), load_external_data=False)  # weights stay in the data file until saved
    attention_layers = _count(model)["Softmax"]
    with _reading_values_from(source.parent), _int_convertible_constants(), _quiet_optimizer():
        fused = optimize_model(model, model_type=model_type, opt_level=0, optimization_options=options).model
        counts = _count(fused)
        ops = {op: counts[op] for op in COUNTED_OPS}
        report = FusionReport(spec.name, target, attention_layers, ops, options.enable_attention)
        for tensor in fused.graph.initializer:  # read the weights in, once, now the graph is final
            if uses_external_data(tensor):
                load_external_data_for_tensor(tensor, str(source.parent))
    if target == "gpu":
        fused = _to_fp16(fused, spec, upcast_attention and not report.complete)
    # weights in a data file whatever the model's size: written tensor by tensor, never serialized twice in memory
    save_onnx(fused, out_path, external=[t.name for t in fused.graph.initializer if t.ByteSize() >= 1024])
    (log.info if report.complete else log.warning)("%s", report.summary())
    return report


def fused_kind(name: str) -> str | None:
    """The MODEL_TYPES key of network ``name`` ("controlnet" for "controlnet.<name>"); None where nothing fuses."""
    kind = NETWORK_FACTS[name].name if is_known_network(name) else name
    return kind if kind in MODEL_TYPES else None


def _to_fp16(model: onnx.ModelProto, spec: NetworkSpec, keep_softmax_fp32: bool) -> onnx.ModelProto:
    """fp16 with spec.keep_fp32 inputs as they are; Resize's scales and GroupNorm's gamma/beta stay fp32
    (ORT's converter knows those inputs once they are initializers); unfused attention islands
    (MatMul -> Softmax -> MatMul) stay fp32 where ``keep_softmax_fp32``."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _constants_to_initializers(model)
    islands = _attention_islands(model) if keep_softmax_fp32 else []
    if islands:
        log.info("%s: %d nodes of unfused attention stay fp32", spec.name, len(islands))
    return convert_float_to_float16(
        model, keep_io_types=list(spec.keep_fp32), disable_shape_infer=True, node_block_list=islands
    )


def _constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn Constant nodes into initializers: the fp16 converter converts a Constant's value whoever
    reads it, so a Resize whose scales come from one no longer loads; an initializer it leaves fp32."""
    constants = [n for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]
    for node in constants:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        model.graph.node.remove(node)


def _attention_islands(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes of each attention left unfused: its Softmax, up through the scaling to the QK^T
    MatMul, down to the MatMul with V."""
    producers = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)

    def walk(node: onnx.NodeProto, step) -> list[str]:  # to the nearest MatMul, a few nodes at most
        names = []
        for _ in range(4):
            node = step(node)
            if node is None:
                break
            names.append(node.name)
            if node.op_type == "MatMul":
                break
        return names

    def up(node: onnx.NodeProto) -> onnx.NodeProto | None:
        return producers.get(node.input[0])

    def down(node: onnx.NodeProto) -> onnx.NodeProto | None:
        return next(iter(consumers[node.output[0]]), None)

    softmaxes = [node for node in model.graph.node if node.op_type == "Softmax"]
    return [name for node in softmaxes for name in (node.name, *walk(node, up), *walk(node, down))]


def _count(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


@contextlib.contextmanager
def _reading_values_from(folder: Path) -> Iterator[None]:
    """Run with ``folder`` as the working directory: ORT's fusions read the values of initializers that
    live in external data with ``numpy_helper.to_array``, which resolves the data file's relative
    location against the working directory (absolute locations are refused by onnx)."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


class _IntArray(np.ndarray):
    """A 1-element array that ``int()`` converts, as NumPy did before 2.4."""

    def __int__(self) -> int:
        return int(self.item())


@contextlib.contextmanager
def _int_convertible_constants() -> Iterator[None]:
    """Inside, ORT's ``OnnxModel.get_constant_value`` returns 1-element arrays as _IntArray (see the module
    docstring: its head-count detection calls ``int()`` on them). Values and shapes are unchanged."""
    from onnxruntime.transformers import optimizer  # noqa: F401 - puts ORT's fusion modules on sys.path

    # the fusions import onnx_model as a top-level module: a second copy of the class beside the package's
    names = ("onnx_model", "onnxruntime.transformers.onnx_model")
    classes = {sys.modules[name].OnnxModel for name in names if name in sys.modules}
    originals = {cls: cls.get_constant_value for cls in classes}

    def convertible(original):
        def get_constant_value(self, output_name):
            value = original(self, output_name)
            return value.view(_IntArray) if isinstance(value, np.ndarray) and value.size == 1 else value

        return get_constant_value

    try:
        for cls, original in originals.items():
            cls.get_constant_value = convertible(original)
        yield
    finally:
        for cls, original in originals.items():
            cls.get_constant_value = original


@contextlib.contextmanager
def _quiet_optimizer() -> Iterator[None]:
    """ORT's optimizer logs each fusion step at INFO (under its own top-level logger names) and draws a
    progress bar on stderr: inside, INFO is off and stderr goes nowhere; warnings still reach the log."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            yield
    finally:
        logging.disable(previous)
