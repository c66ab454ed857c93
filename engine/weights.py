"""Weight maps: which ONNX initializers hold which weights of the source model, and where they lie on disk.

The export writes one beside each ONNX file of a network whose weights may change after export
(the UNet and the text encoders: LoRA), as ``<name>.weights.json``, and names it in the manifest
(ComponentFile.weights). Each entry ties an ONNX initializer to the weight of a Linear or Conv
module of the diffusers/transformers model it holds — stored transposed where the export made a
Linear a MatMul — and records its offset, length, dtype and shape in the network's external data
file, so that NumPy reads the base weights by memory map, without the onnx package. Weights the
export could not tie to initializers of their own are listed in ``unmapped`` with the reason:
they cannot be changed; those the outputs do not depend on at all (dropped as dead code) are
listed in ``unused``: changing them would change nothing.

JSON::

    {"data": "unet.onnx.data",
     "weights": {"onnx::MatMul_1624": {"param": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                                       "param_shape": [320, 320], "transposed": true, "dtype": "float16",
                                       "shape": [320, 320], "offset": 40960, "length": 204800}, ...},
     "unmapped": {"some.module.weight": "why"},
     "unused": ["text_model.encoder.layers.11.mlp.fc1.weight"]}
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdtrt.engine.errors import InvalidInputError, ManifestError


@dataclass(frozen=True)
class MappedWeight:
    """One ONNX initializer holding the weight of one module of the source model."""

    name: str  # the ONNX initializer
    param: str  # the torch parameter, e.g. "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    param_shape: tuple[int, ...]  # (out, in) for a Linear, (out, in, kh, kw) for a Conv
    transposed: bool  # the initializer holds param.T (a Linear's weight as a MatMul operand)
    dtype: str  # NumPy dtype name of the stored initializer
    shape: tuple[int, ...]  # of the stored initializer
    offset: int  # bytes into the external data file
    length: int  # bytes

    def to_dict(self) -> dict:
        return {
            "param": self.param,
            "param_shape": list(self.param_shape),
            "transposed": self.transposed,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "length": self.length,
        }

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> MappedWeight:
        return cls(
            name=name,
            param=str(d["param"]),
            param_shape=tuple(int(n) for n in d["param_shape"]),
            transposed=bool(d["transposed"]),
            dtype=str(np.dtype(d["dtype"])),
            shape=tuple(int(n) for n in d["shape"]),
            offset=int(d["offset"]),
            length=int(d["length"]),
        )


@dataclass(frozen=True)
class WeightMap:
    """The changeable weights of one ONNX file (one component at one precision)."""

    data_path: Path  # the ONNX file's external data
    weights: dict[str, MappedWeight]  # by initializer name
    unmapped: dict[str, str]  # torch parameter -> why no initializer of its own holds it: it cannot change
    unused: tuple[str, ...] = ()  # torch parameters the outputs do not depend on (the export dropped them)

    def to_dict(self) -> dict:
        return {
            "data": self.data_path.name,
            "weights": {name: w.to_dict() for name, w in self.weights.items()},
            "unmapped": dict(self.unmapped),
            "unused": list(self.unused),
        }

    @classmethod
    def from_dict(cls, d: Mapping, folder: Path) -> WeightMap:
        return cls(
            data_path=folder / str(d["data"]),
            weights={str(name): MappedWeight.from_dict(str(name), w) for name, w in d["weights"].items()},
            unmapped={str(k): str(v) for k, v in d["unmapped"].items()},
            unused=tuple(str(p) for p in d["unused"]),
        )

    @functools.cached_property
    def by_param(self) -> dict[str, list[MappedWeight]]:
        """torch parameter -> the initializers holding it (usually one)."""
        found: dict[str, list[MappedWeight]] = {}
        for weight in self.weights.values():
            found.setdefault(weight.param, []).append(weight)
        return found

    @functools.cached_property
    def _data(self) -> np.memmap:
        return np.memmap(self.data_path, dtype=np.uint8, mode="r")

    def base(self, name: str) -> np.ndarray:
        """The exported value of initializer ``name``: a read-only view of the memory-mapped data file."""
        w = self.weights[name]
        raw = self._data[w.offset : w.offset + w.length]
        if raw.size != w.length:
            raise ManifestError(f"{self.data_path} is shorter than its weight map says: re-export the model")
        return raw.view(w.dtype).reshape(w.shape)

    def check(self, weights: Mapping[str, np.ndarray], owner: str) -> None:
        """One clear error unless every array names a mapped initializer with its dtype and shape."""
        unknown = sorted(set(weights) - set(self.weights))
        if unknown:
            raise InvalidInputError(f"{owner}: {', '.join(unknown[:3])} are not changeable weights of this export")
        for name, array in weights.items():
            w = self.weights[name]
            if array.shape != w.shape or array.dtype != np.dtype(w.dtype):
                raise InvalidInputError(
                    f"{owner}: weight {name!r} must be {w.dtype} {w.shape}, got {array.dtype} {array.shape}"
                )


def load_weight_map(path: str | os.PathLike[str]) -> WeightMap:
    """Read a ``<name>.weights.json``; a missing or corrupt one is one ManifestError."""
    path = Path(path)
    try:
        return WeightMap.from_dict(json.loads(path.read_text(encoding="utf-8")), path.parent)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ManifestError(f"cannot read the weight map {path}: {detail} (re-export the model)") from None
