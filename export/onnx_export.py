"""torch module -> optimized ONNX file (fp32), and fp32 ONNX -> fp16 ONNX."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Collection
from pathlib import Path

import onnx
import torch
from onnx.external_data_helper import convert_model_to_external_data, set_external_data, uses_external_data

from sdtrt.engine.fsutil import give_ordinary_permissions
from sdtrt.engine.network_facts import LORA_NETWORKS
from sdtrt.engine.weights import load_weight_map
from sdtrt.export.weight_map import map_path, match_weights, relocate_weight_map, write_weight_map
from sdtrt.export.wrappers import NetworkSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 17  # the lowest opset the exported networks are built and tested for (README)
try:  # the highest opset torch.onnx can write
    from torch.onnx._constants import ONNX_MAX_OPSET as MAX_OPSET
except ImportError:  # a private module: where it is gone, the TorchScript exporter's long-standing maximum
    MAX_OPSET = 20
PROTOBUF_LIMIT = 2**31 - 1  # a ModelProto above 2 GiB must keep its weights in external data


def save_onnx(model: onnx.ModelProto, path: Path, external: Collection[str] = ()) -> None:
    """Save ``model`` to ``path``; weights (of 1 KiB and more) go to one ``path.data`` file when the model
    passes 2 GiB, or when ``external`` names initializers that must be there whatever their size
    (those of a weight map: the runtime memory-maps them). The initializers of ``model`` then point
    into the data file.
    """
    weights = sum(init.ByteSize() for init in model.graph.initializer)
    if not external and weights + (64 << 20) < PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
        return
    location = path.name + ".data"
    # small constants stay inline: ONNX Runtime's shape inference reads them before external data
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location, size_threshold=1024)
    for init in model.graph.initializer:
        if init.name in external and not uses_external_data(init):
            set_external_data(init, location)
    onnx.save_model(model, str(path))
    give_ordinary_permissions(path.with_name(location))  # onnx creates it 0600, unreadable by anyone else


def _optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants, drop dead nodes and sort: the graph TensorRT and ONNX Runtime parse fastest."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.fold_constants(error_ok=True).cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False)


def export_fp32(module: torch.nn.Module, spec: NetworkSpec, out_path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace ``module`` at the spec's opt shapes and write the optimized fp32 ONNX to ``out_path``.

    Networks LoRA changes also get their weight map (export/weight_map.py) beside the file.
    """
    inputs = spec.example_inputs(torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="sdtrt-export-") as work:
        raw = Path(work) / f"{spec.name}.onnx"
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic in diffusers' code
            torch.onnx.export(
                module.eval(),
                inputs,
                str(raw),
                dynamo=False,
                input_names=[s.name for s in spec.inputs],
                output_names=[s.name for s in spec.outputs],
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
            )
        model = onnx.load(str(raw), load_external_data=True)
    model = _optimize(model)
    if spec.name not in LORA_NETWORKS:
        save_onnx(model, out_path)
        return
    matches = match_weights(module, model, inputs)  # on the values in memory, before they move to the data file
    save_onnx(model, out_path, external=matches.mapped)
    write_weight_map(out_path, model, matches)


def convert_fp16(fp32_path: Path, spec: NetworkSpec, out_path: Path) -> None:
    """Write the fp16 variant of an fp32 ONNX model (inputs in ``spec.keep_fp32`` stay fp32), with its weight map."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Path-based shape inference works past 2 GiB, where the in-memory one cannot. Its output sits
    # beside the input so that the relative external-data location still resolves.
    inferred = fp32_path.with_name(f".{fp32_path.stem}.inferred.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(str(fp32_path), str(inferred))
        model = onnx.load(str(inferred), load_external_data=True)
    finally:
        inferred.unlink(missing_ok=True)
    model = convert_float_to_float16(model, keep_io_types=list(spec.keep_fp32), disable_shape_infer=True)
    if spec.name not in LORA_NETWORKS:
        save_onnx(model, out_path)
        return
    source = load_weight_map(map_path(fp32_path))
    save_onnx(model, out_path, external=source.weights)
    relocate_weight_map(source, model, out_path)
