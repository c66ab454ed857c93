"""LMS (LMSDiscreteScheduler): linear multistep of order 4 on the sigma-space ODE dx/dsigma = (x - x0) / sigma."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.polynomial import polynomial

from .base import COMMON_DEFAULTS, SigmaScheduler

LMS_ORDER = 4  # diffusers' default `order` argument of LMSDiscreteScheduler.step


def lms_coefficients(sigmas: np.ndarray, step_index: int, order: int, count: int) -> list[float]:
    """The first ``count`` weights of the order-``order`` Adams-Bashforth step from sigmas[i] to sigmas[i + 1].

    Weight j integrates the Lagrange basis polynomial of node sigmas[i - j] over the nodes sigmas[i - k],
    k < order. diffusers integrates it numerically (scipy quad); a cubic integrates exactly here.
    """
    nodes = sigmas[step_index - np.arange(order)].astype(np.float64)
    lo, hi = float(sigmas[step_index]), float(sigmas[step_index + 1])
    weights = []
    for j in range(count):
        others = np.delete(nodes, j)
        antiderivative = polynomial.polyint(polynomial.polyfromroots(others) / np.prod(nodes[j] - others))
        weights.append(float(polynomial.polyval(hi, antiderivative) - polynomial.polyval(lo, antiderivative)))
    return weights


class LMS(SigmaScheduler):
    """Keeps the last four derivatives (x - x0) / sigma; the step sums them with their LMS weights."""

    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    _defaults: Mapping[str, Any] = MappingProxyType(
        {
            **COMMON_DEFAULTS,
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "timestep_spacing": "linspace",
        }
    )
    _unsupported = ("use_exponential_sigmas", "use_beta_sigmas")
    _repeats_allowed = False  # two equal sigmas make its Lagrange weights 0 / 0

    def _set_timesteps(self, num_inference_steps: int) -> None:
        super()._set_timesteps(num_inference_steps)
        self._derivatives: list[np.ndarray] = []  # newest last

    def _step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None
    ) -> np.ndarray:
        sigma = float(self.sigmas[step_index])
        derivative = (sample - self._predict_x0(model_output, step_index, sample)) / sigma
        self._derivatives = [*self._derivatives[1 - LMS_ORDER :], derivative]
        # As diffusers, the order follows the step index, not the history: a loop that starts late (img2img)
        # weights its first derivatives with the leading coefficients of the full-order formula.
        order = min(step_index + 1, LMS_ORDER)
        weights = lms_coefficients(self.sigmas, step_index, order, len(self._derivatives))
        return sample + sum(w * d for w, d in zip(weights, reversed(self._derivatives), strict=True))
