"""DPM-Solver++(2M) (DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import COMMON_DEFAULTS, Scheduler
from .parameterisation import predict_x0, vp_coefficients
from .schedules import final_sigma, karras_sigmas, sigma_to_t, spaced_timesteps, train_sigmas, within_table


class DPMSolverPP2M(Scheduler):
    """Lu et al. 2022 (arXiv:2211.01095), multistep second order in the data prediction x0.

    In lambda = log(alpha_t / sigma_t) = -log(sigma) (sigma in sigma space), a step of size h = lambda_next -
    lambda has exp(-h) = sigma_next / sigma, which also covers the last step to sigma = 0 without logarithms.
    """

    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    _defaults: Mapping[str, Any] = MappingProxyType(
        {
            **COMMON_DEFAULTS,
            "solver_order": 2,
            "thresholding": False,
            "dynamic_thresholding_ratio": 0.995,
            "sample_max_value": 1.0,
            "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint",
            "lower_order_final": True,
            "euler_at_final": False,
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "use_lu_lambdas": False,
            "use_flow_sigmas": False,
            "flow_shift": 1.0,
            "final_sigmas_type": "zero",
            "lambda_min_clipped": -math.inf,
            "variance_type": None,
            "timestep_spacing": "linspace",
            "rescale_betas_zero_snr": False,
            "use_dynamic_shifting": False,
            "time_shift_type": "exponential",
        }
    )
    _fixed: Mapping[str, Any] = MappingProxyType(
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}
    )
    _unsupported = (
        "thresholding",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "use_lu_lambdas",
        "use_flow_sigmas",
        "use_dynamic_shifting",
        "variance_type",
    )

    def _set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        cfg = self.config
        table = train_sigmas(self.alphas_cumprod)
        if cfg["use_karras_sigmas"]:
            # Karras sigmas over the whole training range, mapped back to (rounded) timesteps.
            sigmas = karras_sigmas(float(table[0]), float(table[-1]), n)
            timesteps = sigma_to_t(sigmas, np.log(table))
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = np.round(timesteps)
        else:
            # lambda_min_clipped cuts off the noisiest timesteps (lambda = log(alpha / sigma), float32).
            alpha, sigma = np.sqrt(self.alphas_cumprod), np.sqrt(np.float32(1) - self.alphas_cumprod)
            lambdas = np.log(alpha) - np.log(sigma)
            last = self.num_train_timesteps - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
            spacing, offset = cfg["timestep_spacing"], cfg["steps_offset"]
            if spacing == "trailing":
                timesteps = spaced_timesteps(spacing, n, self.num_train_timesteps, offset, last)
            else:  # n + 1 points with the one at (or nearest) t = 0 dropped
                timesteps = spaced_timesteps(spacing, n + 1, self.num_train_timesteps, offset, last)[:-1]
            timesteps = within_table(np.round(timesteps), self.num_train_timesteps, last)
            sigmas = np.interp(timesteps, np.arange(len(table)), table)
        self.sigmas = np.append(sigmas, final_sigma(cfg, self.alphas_cumprod)).astype(np.float32)
        self.timesteps = timesteps.astype(np.int64)
        self._x0_history: list[np.ndarray] = []  # the data predictions of the last two steps, oldest first

    def _schedule_problem(self) -> str | None:
        # A step of length 0 is a no-op, but the second-order step after it would divide by its length.
        if np.all(np.diff(self.sigmas)[:-1] < 0):
            return None
        return "more would repeat a noise level, and its second-order steps divide by the step before"

    def _noise_level(self, step_index: int) -> tuple[float, float]:
        return vp_coefficients(float(self.sigmas[step_index]))

    def _step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None
    ) -> np.ndarray:
        cfg = self.config
        num_steps = len(self.timesteps)
        sigma, sigma_next = float(self.sigmas[step_index]), float(self.sigmas[step_index + 1])
        alpha_s, sigma_s = vp_coefficients(sigma)
        alpha_t, sigma_t = vp_coefficients(sigma_next)
        x0 = predict_x0(self.prediction_type, model_output, sample, alpha_s, sigma_s)
        self._x0_history = [*self._x0_history[-1:], x0]
        first_order = len(self._x0_history) < 2 or (
            step_index == num_steps - 1
            and (
                cfg["euler_at_final"]
                or (cfg["lower_order_final"] and num_steps < 15)
                or cfg["final_sigmas_type"] == "zero"
            )
        )
        phi = 1.0 - sigma_next / sigma  # 1 - exp(-h)
        prev = (sigma_t / sigma_s) * sample + alpha_t * phi * x0  # DPM-Solver++(1), i.e. DDIM
        if first_order or sigma_next == sigma:  # a last step of length 0 (final sigma_min) changes nothing
            return prev
        # Second order: D1 is the finite difference of x0 in lambda, scaled to the step h (r0 = h_prev / h).
        sigma_prev = float(self.sigmas[step_index - 1])
        h, h_prev = math.log(sigma / sigma_next), math.log(sigma_prev / sigma)
        d1 = (x0 - self._x0_history[0]) * (h / h_prev)
        if cfg["solver_type"] == "heun":
            return prev + alpha_t * (1.0 - phi / h) * d1
        return prev + 0.5 * alpha_t * phi * d1  # midpoint (diffusers maps logrho / bh1 / bh2 here too)


class DPMSolverPP2MKarras(DPMSolverPP2M):
    """DPM-Solver++(2M) on Karras et al.'s sigma schedule (use_karras_sigmas=True)."""

    name = "dpmpp_2m_karras"
    _fixed: Mapping[str, Any] = MappingProxyType({**DPMSolverPP2M._fixed, "use_karras_sigmas": True})
