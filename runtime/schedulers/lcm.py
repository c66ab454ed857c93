"""Latent Consistency Model sampling (LCMScheduler): few-step multistep consistency sampling."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from sdtrt.engine.errors import InvalidInputError

from .base import COMMON_DEFAULTS, Scheduler
from .parameterisation import predict_x0

SIGMA_DATA = 0.5  # the data standard deviation of the consistency boundary condition


class LCM(Scheduler):
    """Luo et al. 2023 (arXiv:2310.04378), Algorithm 1.

    Each step maps the sample to the consistency function's estimate of x0 (the boundary condition
    c_skip * x + c_out * x0_pred), then re-noises it to the next timestep with fresh noise; the last step
    returns the estimate itself. Timesteps are a subset of the ``original_inference_steps`` schedule the
    model was distilled on.
    """

    name = "lcm"
    diffusers_class = "LCMScheduler"
    stochastic = True
    _defaults: Mapping[str, Any] = MappingProxyType(
        {
            **COMMON_DEFAULTS,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "original_inference_steps": 50,
            "clip_sample": False,
            "clip_sample_range": 1.0,
            "set_alpha_to_one": True,
            "thresholding": False,
            "dynamic_thresholding_ratio": 0.995,
            "sample_max_value": 1.0,
            "timestep_spacing": "leading",
            "timestep_scaling": 10.0,
            "rescale_betas_zero_snr": False,
        }
    )
    _unsupported = ("thresholding",)
    _zero_snr_floor = False

    def _set_timesteps(self, num_inference_steps: int) -> None:
        original = int(self.config["original_inference_steps"])
        if not num_inference_steps <= original <= self.num_train_timesteps:
            raise InvalidInputError(
                f"scheduler 'lcm' takes at most {original} steps with this model's scheduler config "
                f"(original_inference_steps={original}, the schedule it was distilled on), got {num_inference_steps}"
            )
        stride = self.num_train_timesteps // original
        distilled = (np.arange(1, original + 1) * stride - 1)[::-1]  # the distillation schedule, descending
        picks = np.floor(np.linspace(0, original, num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = distilled[picks].astype(np.int64)

    def needs_noise(self, step_index: int) -> bool:
        return step_index != len(self.timesteps) - 1  # the last step returns the clean estimate

    def _step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None
    ) -> np.ndarray:
        t = int(self.timesteps[step_index])
        alpha_prod = float(self.alphas_cumprod[t])
        x0 = predict_x0(self.prediction_type, model_output, sample, alpha_prod**0.5, (1.0 - alpha_prod) ** 0.5)
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            x0 = np.clip(x0, -limit, limit)
        scaled = t * self.config["timestep_scaling"]
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        denoised = c_out * x0 + c_skip * sample
        if noise is None:
            return denoised
        alpha_prod_prev = self._alpha_cumprod_at(int(self.timesteps[step_index + 1]))
        return alpha_prod_prev**0.5 * denoised + (1.0 - alpha_prod_prev) ** 0.5 * noise
