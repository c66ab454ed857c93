"""Build the weight map of an exported network: ONNX initializer -> the torch weight it holds (engine/weights.py).

The TorchScript exporter keeps a parameter's name for an initializer only where the parameter is
used as is (Conv kernels, Gemm operands); a Linear applied to a 3-D input becomes a MatMul whose
operand is the weight transposed, named "onnx::MatMul_<n>", and constant folding may rename more.
So initializers are matched to the weights of every Linear and Conv module by value: a hash of
their bytes, as stored or transposed. Identical values in several initializers (zero or constant
initializations, shared weights) are told apart by the module scope of the nodes that read each
initializer (/unet/down_blocks.0/.../to_q/MatMul reads the weight of down_blocks.0....to_q).
Weights no initializer holds (folded into other constants), or that share one initializer with
another weight, cannot be changed on their own: they are listed in the map's ``unmapped`` with
the reason, never silently dropped. Weights the outputs do not depend on at all (dead code the
export removed) are listed as ``unused``: changing them changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from sdtrt.engine.errors import ExportError
from sdtrt.engine.fsutil import write_json_atomic
from sdtrt.engine.weights import MappedWeight, WeightMap

log = logging.getLogger(__name__)

CHANGEABLE_MODULES = (torch.nn.Linear, torch.nn.Conv2d)  # the modules LoRA adapts

Match = tuple[str, bool, tuple[int, ...]]  # (torch parameter, stored transposed, parameter shape)


def map_path(onnx_path: Path) -> Path:
    """unet.onnx -> unet.weights.json, unet.fp16.onnx -> unet.fp16.weights.json."""
    return onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + ".weights.json")


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _scopes(model: onnx.ModelProto, prefix: str) -> dict[str, set[str]]:
    """Initializer -> the module paths of the nodes reading it ("/unet/a/b.0/c/MatMul" -> "a.b.0.c")."""
    initializers = {init.name for init in model.graph.initializer}
    scopes: dict[str, set[str]] = defaultdict(set)
    for node in model.graph.node:
        parts = node.name.strip("/").split("/")[:-1]
        if parts and parts[0] == prefix:
            parts = parts[1:]
        for name in node.input:
            if name in initializers:
                scopes[name].add(".".join(parts))
    return scopes


@dataclass
class Matches:
    """What the export did with each Linear and Conv weight of a network."""

    mapped: dict[str, Match]  # initializer -> the weight it holds
    unmapped: dict[str, str]  # weight -> why no initializer of its own holds it (it cannot be changed)
    unused: list[str]  # weights the network's outputs do not depend on: the export dropped them


def match_weights(module: torch.nn.Module, model: onnx.ModelProto, inputs: tuple[torch.Tensor, ...]) -> Matches:
    """Tie the weight of every Linear and Conv of ``module`` to the initializers of ``model`` holding it.

    ``module`` is the exported wrapper (wrappers.UNetNet, TextEncoderNet) with the diffusers or
    transformers model as its one child; parameter names are that model's. ``model`` still holds
    its initializers' values (call before saving them to external data). ``inputs`` are the traced
    example inputs: a weight no initializer holds is run through autograd once to tell a weight the
    outputs do not depend on (SDXL reads its first text encoder's penultimate layer, so the export
    drops the last one) from one folded into other constants.
    """
    ((prefix, inner),) = module.named_children()
    targets = {f"{name}.weight": m.weight for name, m in inner.named_modules() if isinstance(m, CHANGEABLE_MODULES)}
    sizes = {t.numel() for t in targets.values()}
    by_hash: dict[bytes, list[str]] = defaultdict(list)
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) in sizes:
            data = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
            by_hash[_digest(data)].append(init.name)
    scopes = _scopes(model, prefix)

    claims: dict[str, list[Match]] = defaultdict(list)  # initializer -> the weights found in it
    unmapped: dict[str, str] = {}
    vanished = []  # weights no initializer holds: folded, or dropped as dead code
    for param, tensor in targets.items():
        value = tensor.detach().float().contiguous().numpy()
        plain = _digest(value)
        candidates = [(name, False) for name in by_hash.get(plain, [])]
        if value.ndim == 2:
            flipped = _digest(np.ascontiguousarray(value.T))
            if flipped != plain:  # a symmetric matrix reads the same both ways
                candidates += [(name, True) for name in by_hash.get(flipped, [])]
        if not candidates:
            unmapped[param] = "no initializer holds its values (folded into other constants by the export)"
            vanished.append(param)
            continue
        if len(candidates) > 1:  # the same values elsewhere too: keep those read by this module's own nodes
            own = param.removesuffix(".weight")
            candidates = [c for c in candidates if own in scopes.get(c[0], ())]
            if not candidates:
                unmapped[param] = "several initializers hold its values and none is read by its own module"
                continue
        for name, transposed in candidates:
            claims[name].append((param, transposed, tuple(value.shape)))

    for name, found in claims.items():
        if len(found) > 1:
            owners = sorted(param for param, _, _ in found)
            for param in owners:
                unmapped[param] = f"shares initializer {name} with {', '.join(p for p in owners if p != param)}"
    mapped = {name: found[0] for name, found in claims.items() if found[0][0] not in unmapped}
    unused = _unused(module, inputs, {p: targets[p] for p in vanished})
    unmapped = {p: why for p, why in unmapped.items() if p not in unused}
    if unmapped:
        log.warning("%s: %d weights cannot be changed after export (see its weight map)", prefix, len(unmapped))
    return Matches(mapped, unmapped, unused)


def _unused(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor]) -> list[str]:
    """The ``weights`` that no output of ``module`` depends on (autograd finds no path to them).

    Run on the first item of the batch only; it is needed only when weights vanished from the graph.
    """
    if not weights:
        return []
    inputs = tuple(t[:1] for t in inputs)
    grads = {name: w.requires_grad for name, w in weights.items()}
    try:
        with torch.enable_grad():
            for w in weights.values():
                w.requires_grad_(True)
            outputs = module(*inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            total = sum(o.float().sum() for o in outputs)
            found = torch.autograd.grad(total, list(weights.values()), allow_unused=True)
    finally:
        for name, w in weights.items():
            w.requires_grad_(grads[name])
    return sorted(name for name, grad in zip(weights, found, strict=True) if grad is None)


def _located(
    model: onnx.ModelProto, onnx_path: Path, mapped: dict[str, Match], data_name: str
) -> dict[str, MappedWeight]:
    """Where each mapped initializer of ``model``, just saved with external data, lies in the data file."""
    weights = {}
    for init in model.graph.initializer:
        if init.name not in mapped:
            continue
        where = {entry.key: entry.value for entry in init.external_data}
        if init.data_location != onnx.TensorProto.EXTERNAL or where.get("location") != data_name:
            raise ExportError(f"{onnx_path}: initializer {init.name} was not saved to {data_name}")
        param, transposed, param_shape = mapped[init.name]
        weights[init.name] = MappedWeight(
            name=init.name,
            param=param,
            param_shape=param_shape,
            transposed=transposed,
            dtype=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).name,
            shape=tuple(int(d) for d in init.dims),
            offset=int(where.get("offset", 0)),
            length=int(where["length"]),
        )
    return weights


def write_weight_map(
    onnx_path: Path, model: onnx.ModelProto, matches: Matches, data_name: str | None = None
) -> WeightMap:
    """Write the map of ``model``, just saved to ``onnx_path`` with external data (in ``data_name``, a file
    beside it: by default its own, ``<file>.data``), beside it."""
    data_name = data_name or onnx_path.name + ".data"
    weight_map = WeightMap(
        data_path=onnx_path.with_name(data_name),
        weights=_located(model, onnx_path, matches.mapped, data_name),
        unmapped=dict(sorted(matches.unmapped.items())),
        unused=tuple(sorted(matches.unused)),
    )
    write_json_atomic(map_path(onnx_path), weight_map.to_dict())
    log.debug("%s: %d weights mapped, %d unmapped", onnx_path.name, len(weight_map.weights), len(matches.unmapped))
    return weight_map


def relocate_weight_map(
    source: WeightMap, model: onnx.ModelProto, onnx_path: Path, data_name: str | None = None
) -> WeightMap:
    """The map ``source`` of the file ``model`` was made from, for ``model`` saved to ``onnx_path`` with its mapped
    weights in ``data_name`` (default: its own data file): after an fp16 conversion, or once its weights point
    into another network's data file (export/step_cache.py share_weights).

    Both keep initializer names, so the matches carry over; offsets, dtypes and shapes are the new file's. An
    initializer the conversion dropped, or that stays outside ``data_name``, makes its weight unmapped.
    """
    data_name = data_name or onnx_path.name + ".data"
    inside = {init.name: _data_file(init) == data_name for init in model.graph.initializer}
    unmapped = dict(source.unmapped)
    for name, w in source.weights.items():
        if not inside.get(name, False):
            where = "is not in" if name not in inside else f"is not stored in {data_name}, beside"
            unmapped[w.param] = f"its initializer {name} {where} {onnx_path.name}"
    mapped = {n: (w.param, w.transposed, w.param_shape) for n, w in source.weights.items() if w.param not in unmapped}
    return write_weight_map(onnx_path, model, Matches(mapped, unmapped, list(source.unused)), data_name)


def _data_file(init: onnx.TensorProto) -> str | None:
    """The external data file an initializer lies in (None: inside the ONNX file)."""
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in init.external_data}.get("location")
