"""LoRA as a low-rank branch beside a weight, fed at run time: what the OpenVINO and ONNX Runtime CPU sessions share.

Every weight-mapped Linear (a MatMul or Gemm operand) and 1x1 convolution of a network gets a branch,

    y = W x + up @ (down @ x)

with ``down`` (rank, in) and ``up`` (out, rank) as network inputs (DOWN + initializer, UP + initializer)
whose rank is dynamic: the runtime feeds the loaded adapters' factors (ranks concatenated, scales
folded into ``up``: runtime/lora_apply.py) and rank 0 where no adapter touches the weight, so loading,
swapping, rescaling and unloading adapters feed other arrays to the same compiled network. With rank 0
the branch adds exact zeros: the outputs are the base graph's bit for bit. The graph edits are
engine/openvino_lora.py and engine/ort_lora.py; kxk convolutions take no branch (OpenVINO's CPU plugin
runs no convolution whose kernel is an input): their LoRA layers are folded into the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.weights import WeightMap

DOWN, UP = "lora_down:", "lora_up:"  # input name prefixes, + the initializer's name


def low_rank(param_shape: tuple[int, ...]) -> bool:
    """Whether a weight of this shape takes its LoRA as a branch: a Linear's or a 1x1 convolution's."""
    return len(param_shape) == 2 or (len(param_shape) == 4 and param_shape[2:] == (1, 1))


def factor_feeds(
    branched: frozenset[str],
    weight_map: WeightMap,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    rank: int | None = None,
) -> dict[str, np.ndarray]:
    """The branch inputs for ``factors`` (initializer -> (down (rank, in), up (out, rank)), float32): rank 0
    for every branched weight they do not name; with a fixed ``rank`` (a static branch), zero-padded to it."""
    feeds = {}
    for name in branched:
        out_features, in_features = weight_map.weights[name].param_shape[:2]
        down, up = factors.get(name, (np.zeros((0, in_features), np.float32), np.zeros((out_features, 0), np.float32)))
        if rank is not None and down.shape[0] < rank:
            down = np.concatenate([down, np.zeros((rank - down.shape[0], in_features), np.float32)])
            up = np.concatenate([up, np.zeros((out_features, rank - up.shape[1]), np.float32)], axis=1)
        feeds[DOWN + name], feeds[UP + name] = down, up
    return feeds


def check_factors(
    branched: frozenset[str],
    weight_map: WeightMap | None,
    factors: Mapping[str, tuple[np.ndarray, np.ndarray]],
    owner: str,
    max_rank: int | None = None,
) -> None:
    """One clear error unless every factor pair names a branched weight with (rank, in) and (out, rank) float32,
    the rank (the adapters' ranks summed) at most ``max_rank`` where the branches are static."""
    if unknown := sorted(set(factors) - branched):
        raise InvalidInputError(f"{owner}: {', '.join(unknown[:3])} take no low-rank branch here")
    for name, (down, up) in factors.items():
        out_features, in_features = weight_map.weights[name].param_shape[:2]
        rank = down.shape[0] if down.ndim == 2 else -1
        if (
            down.shape != (rank, in_features)
            or up.shape != (out_features, rank)
            or {down.dtype, up.dtype} != {np.dtype(np.float32)}
        ):
            raise InvalidInputError(
                f"{owner}: the factors of {name!r} must be float32 (rank, {in_features}) and ({out_features}, rank), "
                f"got {down.dtype} {down.shape} and {up.dtype} {up.shape}"
            )
        if max_rank is not None and rank > max_rank:
            raise InvalidInputError(
                f"{owner}: the adapters' ranks on {weight_map.weights[name].param} add up to {rank}, above this "
                f"session's maximum of {max_rank}"
            )
