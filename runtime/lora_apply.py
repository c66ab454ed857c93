"""Loaded LoRA adapters handed to one session: folded into the weights, or as low-rank factors where the
session runs a branch beside the weight (engine/session.py LowRankSession: switching adapters then
recompiles nothing).

Factors of several adapters on one weight are concatenated along the rank, each adapter's scale
(alpha / rank times the user's) folded into its ``up``: up @ down is then the sum of the scaled deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.session import LowRankSession, Session
from sdtrt.engine.weights import WeightMap
from sdtrt.runtime.lora import LoraAdapter, compose

Factors = dict[str, tuple[np.ndarray, np.ndarray]]  # initializer -> (down (rank, in), up (out, rank))


@dataclass(frozen=True)
class Adapted:
    """What one session gets for a set of adapters: folded weights and branch factors."""

    weights: dict[str, np.ndarray]
    factors: Factors

    def give(self, session: Session) -> None:
        session.set_weights(self.weights)
        if isinstance(session, LowRankSession):
            session.set_factors(self.factors)


def adapt(
    session: Session, weight_map: WeightMap, component: str, adapters: Sequence[tuple[LoraAdapter, float]]
) -> Adapted:
    """``adapters`` at their scales for ``session``: its branched weights as factors, the others folded."""
    branched = session.branched if isinstance(session, LowRankSession) else frozenset()
    return Adapted(
        weights=compose(weight_map, component, adapters, skip=branched),
        factors=low_rank_factors(weight_map, component, adapters, branched),
    )


def low_rank_factors(
    weight_map: WeightMap,
    component: str,
    adapters: Sequence[tuple[LoraAdapter, float]],
    branched: frozenset[str],
) -> Factors:
    """Per branched weight that some adapter at a non-zero scale changes: its factors, float32."""
    active = [(adapter, adapter.layers.get(component, {}), scale) for adapter, scale in adapters if scale != 0]
    factors = {}
    for name in sorted(branched):
        param = weight_map.weights[name].param
        parts = [(layers[param], scale) for _, layers, scale in active if param in layers]
        if not parts:
            continue
        down = np.concatenate([layer.down.reshape(layer.rank, -1).astype(np.float32) for layer, _ in parts])
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below, once
            up = np.concatenate(
                [
                    np.float32(scale * layer.scale) * layer.up.reshape(-1, layer.rank).astype(np.float32)
                    for layer, scale in parts
                ],
                axis=1,
            )
        if not np.isfinite(up).all():
            names = ", ".join(f"{a.path.name} at {s:g}" for a, layers, s in active if param in layers)
            raise InvalidInputError(f"LoRA {names} makes {component} {param} overflow float32: lower the scale")
        # |up @ down| <= rank * max|up| * max|down|: where that bound nears the weight's range, the weight and
        # its delta are summed once, as folding them would be, so that an overflow is refused now, not as NaN later
        limit = float(np.finfo(np.dtype(weight_map.weights[name].dtype)).max) / 2
        if down.shape[0] * float(np.abs(up).max()) * float(np.abs(down).max()) >= limit:
            compose(weight_map, component, adapters, skip=branched - {name})  # raises on overflow
        factors[name] = (np.ascontiguousarray(down), np.ascontiguousarray(up))
    return factors
