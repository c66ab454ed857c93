"""LoRA as a low-rank branch in an ONNX graph for ONNX Runtime: adapters change inputs, never the session.

The graph of a network with a weight map gets, beside every Linear (MatMul or Gemm operand) and 1x1
convolution weight the map names, the branch of engine/openvino_lora.py: ``y + (x @ down.T) @ up.T``
(for a 1x1 convolution ``up @ (down @ x)`` over the channels), with the factors as inputs whose
rank is dynamic. The graph is edited in memory with the ``onnx`` package (without reading the
weights) and ONNX Runtime loads it from bytes, the weights from the export's data file; nothing
is written to disk. Without the ``onnx`` package, sessions fold every LoRA into the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sdtrt.engine.lora_branch import DOWN, UP, low_rank
from sdtrt.engine.weights import WeightMap

log = logging.getLogger(__name__)

EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"  # where ONNX Runtime finds the weights


def branched_graph(path: Path, weight_map: WeightMap) -> tuple[bytes, dict[str, bool]] | None:
    """The ONNX file at ``path`` with a branch beside every weight it can take one (serialized, its weights
    still external) and those weights' names, each with whether its factors are fed transposed (down.T,
    up.T: a MatMul's or Gemm's); None without the ``onnx`` package."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
        from onnx import TensorProto, helper
    except ImportError:
        log.info("%s: no onnx package: LoRA adapters are folded into the weights (a new session each)", path.name)
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError) as exc:  # a damaged file: ONNX Runtime's own load names it
        log.debug("%s: not read for LoRA branches: %s", path.name, exc)
        return None
    graph, nodes, branched = model.graph, [], {}
    shape = helper.make_tensor("lora_flat_shape", TensorProto.INT64, [3], [0, 0, -1])
    for original in graph.node:
        node = onnx.NodeProto()  # a copy: the graph's own nodes are replaced below
        node.CopyFrom(original)
        name = node.input[1] if len(node.input) > 1 else None
        weight = weight_map.weights.get(name)
        if weight is None or not low_rank(weight.param_shape) or not _plain(node):
            nodes.append(node)
            continue
        out_features, in_features = weight.param_shape[:2]
        x, y, down, up = node.input[0], node.output[0], DOWN + name, UP + name
        base = node.output[0] = f"{y}/lora_base"
        nodes.append(node)
        if node.op_type == "Conv":  # up @ (down @ x) over the channels of (N, in, H*W)
            nodes += [
                helper.make_node("Reshape", [x, shape.name], [f"{y}/lora_x"]),
                helper.make_node("MatMul", [down, f"{y}/lora_x"], [f"{y}/lora_t"]),
                helper.make_node("MatMul", [up, f"{y}/lora_t"], [f"{y}/lora_p"]),
                helper.make_node("Shape", [base], [f"{y}/lora_s"]),
                helper.make_node("Reshape", [f"{y}/lora_p", f"{y}/lora_s"], [f"{y}/lora_d"]),
            ]
            shapes = ([None, in_features], [out_features, None])
        else:  # x @ down.T @ up.T, the factors fed transposed
            nodes += [
                helper.make_node("MatMul", [x, down], [f"{y}/lora_t"]),
                helper.make_node("MatMul", [f"{y}/lora_t", up], [f"{y}/lora_d"]),
            ]
            shapes = ([in_features, None], [None, out_features])
        nodes.append(helper.make_node("Add", [base, f"{y}/lora_d"], [y]))
        for input_name, dims in zip((down, up), shapes, strict=True):
            dims = [d if d is not None else f"lora_rank_{len(branched)}" for d in dims]
            graph.input.append(helper.make_tensor_value_info(input_name, TensorProto.FLOAT, dims))
        branched[name] = node.op_type != "Conv"
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.append(shape)
    log.debug("%s: low-rank branches beside %d of %d mapped weights", path.name, len(branched), len(weight_map.weights))
    return model.SerializeToString(), branched


def _plain(node) -> bool:
    """A layer whose branch is the plain low-rank product: MatMul, Gemm(transB=1), 1x1 Conv (stride 1, no pads)."""
    attributes = _attributes(node)
    if node.op_type == "MatMul":
        return True
    if node.op_type == "Gemm":
        return attributes.get("transB") == 1 and not attributes.get("transA") and attributes.get("alpha", 1.0) == 1.0
    if node.op_type == "Conv":  # 1x1: the weight map's shape says so
        return (
            all(s == 1 for s in attributes.get("strides", [1]))
            and all(d == 1 for d in attributes.get("dilations", [1]))
            and not any(attributes.get("pads", [0]))
            and attributes.get("group", 1) == 1
        )
    return False


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}
