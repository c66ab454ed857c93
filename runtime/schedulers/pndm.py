"""PNDM (PNDMScheduler): pseudo linear multistep (PLMS), optionally warmed up by pseudo Runge-Kutta (PRK)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from sdtrt.engine.errors import InvalidInputError

from .base import COMMON_DEFAULTS, Scheduler
from .parameterisation import predict_eps
from .schedules import spaced_timesteps, within_table

# Adams-Bashforth weights of the PLMS combination by number of stored model outputs (newest first).
_PLMS_WEIGHTS = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


class PNDM(Scheduler):
    """Liu et al. 2022. With skip_prk_steps (Stable Diffusion's setting) the first step is a second-order
    Heun-like step on a repeated timestep; without it, 3 PRK steps of 4 model calls each come first.
    """

    name = "pndm"
    diffusers_class = "PNDMScheduler"
    _defaults: Mapping[str, Any] = MappingProxyType(
        {**COMMON_DEFAULTS, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading"}
    )
    _prediction_types = ("epsilon", "v_prediction")

    def _set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        cfg = self.config
        spaced = spaced_timesteps(cfg["timestep_spacing"], n, self.num_train_timesteps, cfg["steps_offset"])
        ascending = within_table(np.round(spaced), self.num_train_timesteps)[::-1].astype(np.int64)
        if cfg["skip_prk_steps"]:
            self._prk_steps = 0
            # The first timestep twice: a plain step, then the same interval again averaging both outputs.
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
            self.timesteps = plms.astype(np.int64)
        else:
            if n < 4:
                raise InvalidInputError("pndm with skip_prk_steps=False needs at least 4 inference steps")
            # Each of the 3 Runge-Kutta steps evaluates at t, t - stride/2 (twice) and t - stride.
            half = self.num_train_timesteps // n // 2
            prk = np.repeat(ascending[-4:], 2) + np.tile([0, half], 4)
            prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
            self._prk_steps = len(prk)
            self.timesteps = np.concatenate([prk, ascending[:-3][::-1]]).astype(np.int64)
        self._ets: list[np.ndarray] = []  # model outputs of past full steps, oldest first
        self._counter = 0  # steps taken since set_timesteps
        self._cur_sample: np.ndarray | None = None
        self._cur_model_output: np.ndarray | float = 0.0

    def _step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None
    ) -> np.ndarray:
        if self._counter < self._prk_steps:
            if self._counter == 0 and step_index != 0:
                raise InvalidInputError("pndm with skip_prk_steps=False must start at step_index 0")
            prev = self._step_prk(model_output, step_index, sample)
        else:
            prev = self._step_plms(model_output, step_index, sample)
        self._counter += 1
        return prev

    def _step_prk(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        # Stages 0-2 step from the RK step's start sample with their own output (the next stage's input);
        # stage 3 steps the whole interval with the RK4 combination (1/6, 1/3, 1/3, 1/6) of all four.
        stage = self._counter % 4
        half = self.num_train_timesteps // self.num_inference_steps // 2
        prev_t = int(self.timesteps[step_index]) - (0 if self._counter % 2 else half)
        t = int(self.timesteps[self._counter - stage])
        if stage == 0:
            self._cur_model_output = model_output / 6
            self._ets.append(model_output)
            self._cur_sample = sample
        elif stage in (1, 2):
            self._cur_model_output = self._cur_model_output + model_output / 3
        else:
            model_output = self._cur_model_output + model_output / 6
            self._cur_model_output = 0.0
        assert self._cur_sample is not None  # set at stage 0
        return self._prev_sample(self._cur_sample, t, prev_t, model_output)

    def _step_plms(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        stride = self.num_train_timesteps // self.num_inference_steps
        t = int(self.timesteps[step_index])
        prev_t = t - stride
        if self._counter == 1:
            # The repeated first timestep: redo the interval t + stride -> t with the averaged output.
            prev_t, t = t, t + stride
        else:
            self._ets = [*self._ets[-3:], model_output]
        if self._counter == 0:
            self._cur_sample = sample
        elif self._counter == 1:
            assert self._cur_sample is not None  # set at counter 0
            model_output = (model_output + self._ets[-1]) / 2
            sample, self._cur_sample = self._cur_sample, None
        else:
            weights = _PLMS_WEIGHTS[len(self._ets)]
            model_output = sum(w * e for w, e in zip(weights, reversed(self._ets), strict=True))
        return self._prev_sample(sample, t, prev_t, model_output)

    def _prev_sample(self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray) -> np.ndarray:
        """Eq. 9 of the paper: the transfer from x_t to x_prev_t given the (combined) noise estimate."""
        alpha_prod, alpha_prod_prev = self._alpha_cumprod_at(t), self._alpha_cumprod_at(prev_t)
        eps = predict_eps(self.prediction_type, model_output, sample, alpha_prod**0.5, (1 - alpha_prod) ** 0.5)
        denom = alpha_prod * (1 - alpha_prod_prev) ** 0.5 + (alpha_prod * (1 - alpha_prod) * alpha_prod_prev) ** 0.5
        return (alpha_prod_prev / alpha_prod) ** 0.5 * sample - (alpha_prod_prev - alpha_prod) * eps / denom
