"""The one interface the runtime sees: a Session runs a network on named NumPy arrays."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from sdtrt.engine.errors import InvalidInputError

Dim = int | str  # a fixed size, or the name of a dynamic dimension ("batch", "latent_height", ...)


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of one network input or output."""

    name: str
    dtype: str  # NumPy dtype name: "float32", "float16", "int32", ...
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping) -> TensorSpec:
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(d["shape"]))

    def bind(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The concrete shape once every dynamic dimension has a value."""
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)


@runtime_checkable
class Session(Protocol):
    """A loaded network. ``run`` returns arrays the caller owns (never views of reused buffers).

    ``set_weights`` gives named ONNX initializers new values (LoRA): every initializer it does not
    name has its exported value, so an empty mapping restores the base weights. Only the weights
    of the component's weight map (engine/weights.py) may be named, at their dtype and shape.
    """

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None: ...

    def close(self) -> None: ...


def check_feeds(name: str, specs: Mapping[str, TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    """Raise one clear error when ``feeds`` do not match a session's inputs in names, dtypes or ranks.

    Dynamic dimensions must agree across inputs: every use of "batch" has the same value.
    """
    missing = sorted(set(specs) - set(feeds))
    unknown = sorted(set(feeds) - set(specs))
    if missing or unknown:
        raise InvalidInputError(f"{name}: inputs {missing} missing, {unknown} unknown (expects {sorted(specs)})")
    bound: dict[str, int] = {}
    for key, spec in specs.items():
        array = feeds[key]
        if array.dtype != np.dtype(spec.dtype):
            raise InvalidInputError(f"{name}: input {key!r} is {array.dtype}, expected {spec.dtype}")
        if array.ndim != len(spec.shape):
            raise InvalidInputError(
                f"{name}: input {key!r} has shape {array.shape}, expected rank {len(spec.shape)} {spec.shape}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(want, int):
                if want != got:
                    raise InvalidInputError(
                        f"{name}: input {key!r} has shape {array.shape}, axis {axis} must be {want}"
                    )
            elif bound.setdefault(want, got) != got:
                raise InvalidInputError(
                    f"{name}: dimension {want!r} is {bound[want]} in one input and {got} in {key!r}"
                )


@runtime_checkable
class LowRankSession(Protocol):
    """A session that runs some weights' LoRA as a low-rank branch beside them, fed at run time: changing
    adapters feeds other factors to the same compiled network (engine/openvino_lora.py).

    ``branched`` names those weights (initializers of the weight map); ``set_factors`` takes, per
    such weight, down (rank, in) and up (out, rank) float32 with the scales folded into up; every
    branched weight it does not name gets rank 0, which leaves the outputs the base ones bit for bit.
    """

    branched: frozenset[str]

    def set_factors(self, factors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None: ...
