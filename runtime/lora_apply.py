"""Loaded LoRA adapters handed to one session: folded into the weights (compose: base + the scaled deltas,
recomputed from the base every time), or as low-rank factors where the session runs a branch beside the
weight (engine/session.py LowRankSession: switching adapters then recompiles nothing).

Factors of several adapters on one weight are concatenated along the rank, each adapter's scale
(alpha / rank times the user's) folded into its ``up``: up @ down is then the sum of the scaled deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.session import LowRankSession, Session
from sdtrt.engine.weights import MappedWeight, WeightMap
from sdtrt.runtime.lora import LoraAdapter

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


def compose(
    weight_map: WeightMap,
    component: str,
    adapters: Sequence[tuple[LoraAdapter, float]],
    skip: frozenset[str] = frozenset(),
) -> dict[str, np.ndarray]:
    """The initializers of one component under ``adapters`` at their scales: base + sum(scale * delta),
    but for those in ``skip`` (a session's low-rank branches take them: runtime/lora_apply.py).

    Computed in float32 from the export's base values and stored at the initializer's dtype and
    layout. Only adapted initializers are returned: an empty dict means the base weights. Weights
    that overflow (to inf or NaN, at float32 or at the initializer's fp16) are one InvalidInputError.
    """
    active = [(adapter, adapter.layers.get(component, {}), scale) for adapter, scale in adapters if scale != 0]
    weights = {}
    for param in sorted({param for _, layers, _ in active for param in layers}):
        for w in [w for w in _holding(weight_map, component, param) if w.name not in skip]:
            value = weight_map.base(w.name).astype(np.float32)  # a copy: the base stays untouched
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below, once
                for _, layers, scale in active:
                    if param in layers:
                        value += layers[param].delta(w, scale)
                stored = value.astype(w.dtype, copy=False)
            if not np.isfinite(stored).all():
                names = ", ".join(f"{a.path.name} at {s:g}" for a, layers, s in active if param in layers)
                raise InvalidInputError(f"LoRA {names} makes {component} {param} overflow {w.dtype}: lower the scale")
            weights[w.name] = stored
    return weights


def _holding(weight_map: WeightMap, component: str, param: str) -> list[MappedWeight]:
    """The initializers of ``weight_map`` holding ``param``; none where the network does not use it (the shallow
    UNet of step caching skips the deep layers); one clear error where it uses it but cannot change it."""
    if param in weight_map.by_param:
        return weight_map.by_param[param]
    if param in weight_map.unused:
        return []
    why = weight_map.unmapped.get(param, "its weight map does not name it")
    raise InvalidInputError(f"LoRA changes {component} {param}, which a network of this export cannot change ({why})")
