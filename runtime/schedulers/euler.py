"""Euler (EulerDiscreteScheduler) and Euler ancestral (EulerAncestralDiscreteScheduler) in sigma space."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import COMMON_DEFAULTS, SigmaScheduler


class Euler(SigmaScheduler):
    """Karras et al.'s Euler step of the probability-flow ODE, dx/dsigma = (x - x0) / sigma (no churn)."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    _defaults: Mapping[str, Any] = MappingProxyType(
        {
            **COMMON_DEFAULTS,
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "sigma_min": None,
            "sigma_max": None,
            "timestep_spacing": "linspace",
            "timestep_type": "discrete",
            "rescale_betas_zero_snr": False,
            "final_sigmas_type": "zero",
        }
    )
    _unsupported = ("use_exponential_sigmas", "use_beta_sigmas")

    def _set_timesteps(self, num_inference_steps: int) -> None:
        super()._set_timesteps(num_inference_steps)
        if self.config["timestep_type"] == "continuous" and self.prediction_type == "v_prediction":
            # Continuous-time v models take c_noise = log(sigma) / 4 (EDM) instead of a training timestep.
            self.timesteps = (np.float32(0.25) * np.log(self.sigmas[:-1])).astype(np.float32)

    def _step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None
    ) -> np.ndarray:
        sigma, sigma_next = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        derivative = (sample - self._predict_x0(model_output, step_index, sample)) / sigma
        return sample + derivative * (sigma_next - sigma)


class EulerAncestral(SigmaScheduler):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of size sigma_up.

    sigma_up and sigma_down split sigma_next**2 = sigma_down**2 + sigma_up**2 so that the step matches the
    DDPM ancestral variance (k-diffusion's get_ancestral_step with eta = 1).
    """

    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    stochastic = True
    _defaults: Mapping[str, Any] = MappingProxyType(
        {**COMMON_DEFAULTS, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False}
    )
    _prediction_types = ("epsilon", "v_prediction")

    def _step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None
    ) -> np.ndarray:
        assert noise is not None  # Scheduler.step requires it for stochastic schedulers
        sigma, sigma_next = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (sample - self._predict_x0(model_output, step_index, sample)) / sigma
        return sample + derivative * (sigma_down - sigma) + noise * sigma_up
