"""DDIM (DDIMScheduler): deterministic for eta = 0, DDPM-like ancestral noise for eta > 0."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from sdtrt.engine.errors import InvalidInputError

from .base import COMMON_DEFAULTS, Scheduler
from .parameterisation import predict_eps, predict_x0
from .schedules import spaced_timesteps, within_table


class DDIM(Scheduler):
    """Song et al. 2020, eq. 12. ``eta`` (an override, diffusers' step argument) scales the added noise."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    _defaults: Mapping[str, Any] = MappingProxyType(
        {
            **COMMON_DEFAULTS,
            "clip_sample": True,
            "set_alpha_to_one": True,
            "thresholding": False,
            "dynamic_thresholding_ratio": 0.995,
            "clip_sample_range": 1.0,
            "sample_max_value": 1.0,
            "timestep_spacing": "leading",
            "rescale_betas_zero_snr": False,
        }
    )
    _options: Mapping[str, Any] = MappingProxyType({"eta": 0.0})
    _unsupported = ("thresholding",)
    _zero_snr_floor = False  # DDIMScheduler keeps alphas_cumprod[-1] = 0 after rescaling

    def __init__(self, config: Mapping[str, Any], **overrides: Any) -> None:
        super().__init__(config, **overrides)
        eta = self.config["eta"]
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta < math.inf:
            raise InvalidInputError(f"ddim eta must be a number >= 0, got {eta!r}")
        self.eta = float(eta)
        self.stochastic = self.eta > 0

    def _set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        timesteps = spaced_timesteps(
            cfg["timestep_spacing"], num_inference_steps, self.num_train_timesteps, cfg["steps_offset"]
        )
        self.timesteps = within_table(np.round(timesteps), self.num_train_timesteps).astype(np.int64)

    def _step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None
    ) -> np.ndarray:
        t = int(self.timesteps[step_index])
        # As diffusers: the previous timestep is one nominal stride back, whatever the spacing.
        alpha_prod = self._alpha_cumprod_at(t)
        alpha_prod_prev = self._alpha_cumprod_at(t - self.num_train_timesteps // self.num_inference_steps)
        alpha, sigma = alpha_prod**0.5, (1.0 - alpha_prod) ** 0.5
        x0 = predict_x0(self.prediction_type, model_output, sample, alpha, sigma)
        eps = predict_eps(self.prediction_type, model_output, sample, alpha, sigma)
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            x0 = np.clip(x0, -limit, limit)
        # sigma_t(eta) of eq. 16: eta times the DDPM posterior standard deviation.
        variance = (1.0 - alpha_prod_prev) / (1.0 - alpha_prod) * (1.0 - alpha_prod / alpha_prod_prev)
        std = self.eta * variance**0.5
        prev = alpha_prod_prev**0.5 * x0 + (1.0 - alpha_prod_prev - std**2) ** 0.5 * eps
        return prev + std * noise if noise is not None else prev
