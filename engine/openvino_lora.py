"""LoRA as a low-rank branch in an OpenVINO model (engine/lora_branch.py): adapters change inputs, never the
compiled model. OpenVINO's CPU plugin does not run a convolution whose kernel is an
input, so kxk convolutions have no branch: their LoRA layers are folded into the weights
(OpenVinoSession.set_weights, which recompiles), as every layer was before.
"""

from __future__ import annotations

import logging

import numpy as np

from sdtrt.engine.lora_branch import DOWN, UP, low_rank
from sdtrt.engine.weights import WeightMap

log = logging.getLogger(__name__)


BIAS_WRAPPERS = ("Convert", "Reshape", "Unsqueeze")  # between a bias constant and its Add


def named_weights(model) -> dict[str, object]:
    """The model's nodes that yield each initializer's value, by the initializer's name: the constant itself
    (read from ONNX), or the Convert that decompresses it (read from the fp16 IR: the constant is then
    "<name>_compressed")."""
    found = {}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "Constant" or (kind == "Convert" and op.input_value(0).get_node().get_type_name() == "Constant"):
            found.setdefault(op.get_friendly_name(), op)
    return found


def branch_sites(model, weight_map: WeightMap) -> dict[str, object]:
    """The layers of ``model`` that take a branch, by the initializer name of their weight: a MatMul whose
    second operand is a mapped Linear weight, a 1x1 convolution (stride 1, no padding) of a mapped kernel."""
    nodes = named_weights(model)
    sites = {}
    for name, weight in weight_map.weights.items():
        if name not in nodes or not low_rank(weight.param_shape):
            continue
        targets = list(nodes[name].output(0).get_target_inputs())
        if len(targets) != 1 or targets[0].get_index() != 1:
            continue
        layer = targets[0].get_node()
        if (layer.get_type_name() == "MatMul" and not layer.get_transpose_a()) or (
            layer.get_type_name() == "Convolution" and _pointwise(layer)
        ):
            sites[name] = layer
    return sites


def add_branches(model, weight_map: WeightMap, rank: int | None = None) -> frozenset[str]:
    """Give ``model`` a low-rank branch beside every weight of ``weight_map`` it can (branch_sites); the
    initializer names of those weights (their factors are the inputs DOWN + name and UP + name), of dynamic
    rank, or of this fixed ``rank`` (factors zero-padded to it: a static model)."""
    from openvino import opset13 as ops

    sites, parameters = branch_sites(model, weight_map), []
    for name, layer in sites.items():
        out_features, in_features = weight_map.weights[name].param_shape[:2]
        down = ops.parameter([rank or -1, in_features], np.float32, name=DOWN + name)
        up = ops.parameter([out_features, rank or -1], np.float32, name=UP + name)
        x, anchor = layer.input_value(0), _with_bias(layer)  # after the bias: the layer and its bias still fuse
        consumers = list(anchor.output(0).get_target_inputs())
        if layer.get_type_name() == "MatMul":
            delta = ops.matmul(ops.matmul(x, down, False, True), up, False, True)  # x @ down.T @ up.T
        else:  # 1x1 convolution: up @ (down @ x) over the channels of (N, in, H*W)
            flat = ops.reshape(x, ops.constant(np.array([0, 0, -1], np.int64)), special_zero=True)
            product = ops.matmul(up, ops.matmul(down, flat, False, False), False, False)  # (N, out, H*W)
            delta = ops.reshape(product, ops.shape_of(anchor.output(0)), special_zero=False)
        total = ops.add(anchor.output(0), delta)
        for consumer in consumers:
            consumer.replace_source_output(total.output(0))
        for parameter in (down, up):
            parameter.output(0).get_tensor().set_names({parameter.get_friendly_name()})
        parameters += [down, up]
    model.add_parameters(parameters)
    model.validate_nodes_and_infer_types()
    log.debug("low-rank branches beside %d of %d mapped weights", len(sites), len(weight_map.weights))
    return frozenset(sites)


def _with_bias(layer):
    """The Add of a constant bias that is the layer's one consumer but for shape reads (ONNX's Linear: MatMul, then
    Add; OpenVINO reads a Conv's bias as an Add of a reshaped constant), else the layer itself."""
    targets = [t for t in layer.output(0).get_target_inputs() if t.get_node().get_type_name() != "ShapeOf"]
    if len(targets) == 1 and (add := targets[0].get_node()).get_type_name() == "Add":
        other = add.input_value(1 - targets[0].get_index()).get_node()
        while other.get_type_name() in BIAS_WRAPPERS:
            other = other.input_value(0).get_node()
        if other.get_type_name() == "Constant":
            return add
    return layer


def _pointwise(layer) -> bool:
    """A plain 1x1 convolution: stride 1, no padding, no dilation."""
    return (
        all(s == 1 for s in layer.get_strides())
        and all(d == 1 for d in layer.get_dilations())
        and not any(layer.get_pads_begin())
        and not any(layer.get_pads_end())
    )
