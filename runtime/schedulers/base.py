"""The scheduler base classes: config resolution, validation, index-based stepping, img2img split points.

Each scheduler mirrors one diffusers class step for step: its tables come from .schedules (float32, as
diffusers builds them); the per-step arithmetic runs in float64 and its results are returned as float32.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from sdtrt.engine.errors import InvalidInputError

from .parameterisation import predict_x0, vp_coefficients
from .schedules import (
    cumprod_alphas,
    final_sigma,
    karras_sigmas,
    make_betas,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
    within_table,
)

# The keys every mirrored diffusers class takes, with diffusers' defaults.
COMMON_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "steps_offset": 0,
    }
)

# Allowed values of the string-valued keys, checked for whichever of them a scheduler knows.
_CHOICES: Mapping[str, tuple[str, ...]] = {
    "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "final_sigmas_type": ("zero", "sigma_min"),
    "interpolation_type": ("linear", "log_linear"),
    "timestep_type": ("discrete", "continuous"),
    "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
}


def _join(values: Any) -> str:
    return ", ".join(map(str, values))


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value < 1.0:
        raise InvalidInputError(f"{name} must be a number strictly between 0 and 1, got {value!r}")


class Scheduler(ABC):
    """A diffusers scheduler in NumPy: set_timesteps, then per step i scale_model_input and step.

    Configured like ``DiffusersClass.from_config(config, **overrides)``: keys the diffusers class does not take
    are ignored, missing ones take that class's defaults. ``step`` must be called with consecutive indices
    after set_timesteps (starting at any index, as img2img does); multistep history lives in the instance.
    """

    name: ClassVar[str]
    diffusers_class: ClassVar[str]
    stochastic: bool = False  # step() needs `noise`
    order: int = 1
    init_noise_sigma: float = 1.0

    _defaults: ClassVar[Mapping[str, Any]]  # the diffusers class's __init__ keys and defaults
    _options: ClassVar[Mapping[str, Any]] = MappingProxyType({})  # sdtrt-only settings, overrides only
    _fixed: ClassVar[Mapping[str, Any]] = MappingProxyType({})  # keys the scheduler's name pins
    _unsupported: ClassVar[tuple[str, ...]] = ()  # keys that must stay false / None
    _prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    _timestep_dtype: ClassVar[type[np.generic]] = np.int64
    _zero_snr_floor: ClassVar[bool] = True  # rescaled betas: keep alphas_cumprod[-1] at 2**-24, not 0

    def __init__(self, config: Mapping[str, Any], **overrides: Any) -> None:
        known = {**self._defaults, **self._options}
        for key, value in overrides.items():
            if key not in known:
                raise InvalidInputError(
                    f"scheduler {self.name!r} has no option {key!r} (options: {_join(sorted(known))})"
                )
            if key in self._fixed and value != self._fixed[key]:
                raise InvalidInputError(
                    f"scheduler {self.name!r} always uses {key}={self._fixed[key]!r}; pick another scheduler"
                )
        defaulted = set(config.get("_use_default_values") or ())
        cfg = {**known, **{k: v for k, v in config.items() if k in self._defaults and k not in defaulted}}
        self.config: Mapping[str, Any] = MappingProxyType({**cfg, **overrides, **self._fixed})
        self._validate()

        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        self.prediction_type: str = self.config["prediction_type"]
        self.alphas_cumprod = cumprod_alphas(make_betas(self.config))
        if self.config.get("rescale_betas_zero_snr") and self._zero_snr_floor:
            self.alphas_cumprod[-1] = 2.0**-24
        self.timesteps = np.zeros(0, dtype=self._timestep_dtype)
        self.num_inference_steps = 0
        self._next_index: int | None = None

    def _validate(self) -> None:
        for key in self._unsupported:
            if self.config[key]:
                raise InvalidInputError(
                    f"scheduler {self.name!r}: {key}={self.config[key]!r} is not supported by sdtrt"
                )
        choices = {**_CHOICES, "prediction_type": self._prediction_types}
        for key, allowed in choices.items():
            if key in self.config and self.config[key] not in allowed:
                raise InvalidInputError(
                    f"scheduler {self.name!r}: {key}={self.config[key]!r} is not supported "
                    f"(supported: {_join(allowed)})"
                )

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Compute the schedule for ``num_inference_steps`` denoising steps and clear all multistep history."""
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.num_train_timesteps:
            raise InvalidInputError(
                f"num_inference_steps must be an integer from 1 to {self.num_train_timesteps}, got {n!r}"
            )
        if problem := self._schedule(int(n)):
            top = self._most_steps(int(n))
            self.timesteps = self.timesteps[:0]  # unusable until a set_timesteps succeeds
            raise InvalidInputError(
                f"scheduler {self.name!r} takes {f'at most {top}' if top else 'no number of'} steps with this "
                f"model's scheduler config ({problem}), got {n}"
            )

    def _most_steps(self, below: int) -> int:
        """The largest step count under ``below`` whose schedule works (0: none), by bisection: the schedules
        that fail are those whose steps grow too fine, so a count that works has none that fail below it."""
        good, bad = 0, below
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if self._schedule(middle) is None else (good, middle)
        return good

    def _schedule(self, num_inference_steps: int) -> str | None:
        """Set the schedule for ``num_inference_steps``; what is wrong with it, or None."""
        self.num_inference_steps = num_inference_steps
        self._next_index = None
        self._set_timesteps(num_inference_steps)
        return self._schedule_problem()

    @abstractmethod
    def _set_timesteps(self, num_inference_steps: int) -> None:
        """Fill ``timesteps`` (and the scheduler's own tables) and reset its multistep history."""

    def _schedule_problem(self) -> str | None:
        """Why the schedule just set cannot be stepped (a scheduler whose valid range ends below
        num_train_timesteps says so here), or None."""
        return None

    def strength_start(self, steps: int, strength: float) -> int:
        """The timestep index img2img/inpaint start at: diffusers' get_timesteps (only int(steps * strength) run).

        len(self.timesteps) means no step runs.
        """
        init_steps = min(int(steps * strength), steps)
        if init_steps == 0:
            return len(self.timesteps)  # no step at all (PNDM's extra first timestep must not sneak one in)
        return (steps - init_steps) * self.order

    def cutoff(self, fraction: float) -> int:
        """The training timestep where a two-stage split at ``fraction`` of the schedule falls (diffusers' rule)."""
        return round(self.num_train_timesteps - fraction * self.num_train_timesteps)

    def end_index(self, denoising_end: float | None) -> int:
        """Where a first stage stops: after the timesteps at or above the cutoff (SDXL base's denoising_end)."""
        if denoising_end is None:
            return len(self.timesteps)
        _check_fraction("denoising_end", denoising_end)
        return int(np.sum(self.timesteps >= self.cutoff(denoising_end)))

    def continue_index(self, denoising_start: float) -> int:
        """Where a second stage starts: at the first timestep below the cutoff (the refiner's denoising_start)."""
        _check_fraction("denoising_start", denoising_start)
        remaining = int(np.sum(self.timesteps < self.cutoff(denoising_start)))
        if self.order == 2 and remaining % 2 == 0:
            remaining += 1  # as diffusers: a second-order scheduler must not start between its two halves
        return len(self.timesteps) - remaining

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        """The UNet input at step ``step_index``: the sample itself unless the scheduler works in sigma space."""
        self._check_index(step_index)
        return np.asarray(sample, dtype=np.float32)

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """One denoising step: the float32 sample at the next timestep. ``noise`` is used only if needs_noise."""
        self._check_index(step_index)
        if self._next_index is not None and step_index != self._next_index:
            raise InvalidInputError(
                f"step_index {step_index} is out of order: expected {self._next_index} "
                "(call set_timesteps to start over)"
            )
        self._check_shape("model_output", model_output, sample)
        if self.needs_noise(step_index):
            if noise is None:
                raise InvalidInputError(f"scheduler {self.name!r} is stochastic: step() needs `noise`")
            self._check_shape("noise", noise, sample)
            noise = np.array(noise, dtype=np.float64)
        else:
            noise = None
        # Copies: multistep history may keep them.
        prev = self._step(
            np.array(model_output, dtype=np.float64), step_index, np.array(sample, dtype=np.float64), noise
        )
        self._next_index = step_index + 1
        return prev.astype(np.float32)

    def needs_noise(self, step_index: int) -> bool:
        """Whether step ``step_index`` takes ``noise`` (the caller draws it only then, keeping draws in order)."""
        return self.stochastic

    @abstractmethod
    def _step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None
    ) -> np.ndarray:
        """The float64 step on validated float64 inputs (noise is None unless the scheduler is stochastic)."""

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """``original`` noised to the level of timesteps[step_index] (the start of an img2img loop)."""
        self._check_index(step_index)
        self._check_shape("noise", noise, original)
        alpha, sigma = self._noise_level(step_index)
        noisy = alpha * np.asarray(original, dtype=np.float64) + sigma * np.asarray(noise, dtype=np.float64)
        return noisy.astype(np.float32)

    def _noise_level(self, step_index: int) -> tuple[float, float]:
        """(alpha, sigma) with x_t = alpha * x0 + sigma * eps at timesteps[step_index]."""
        alpha_cumprod = float(self.alphas_cumprod[int(self.timesteps[step_index])])
        return alpha_cumprod**0.5, (1.0 - alpha_cumprod) ** 0.5

    def _alpha_cumprod_at(self, timestep: int) -> float:
        """alphas_cumprod[timestep]; before t=0 it is 1 (set_alpha_to_one) or alphas_cumprod[0]."""
        if timestep >= 0:
            return float(self.alphas_cumprod[timestep])
        return 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def _check_index(self, step_index: int) -> None:
        if not 0 <= step_index < len(self.timesteps):
            raise InvalidInputError(
                f"step_index {step_index} is out of range for {len(self.timesteps)} timesteps"
                + ("" if len(self.timesteps) else " (call set_timesteps first)")
            )

    @staticmethod
    def _check_shape(what: str, array: np.ndarray, sample: np.ndarray) -> None:
        if np.shape(array) != np.shape(sample):
            raise InvalidInputError(f"{what} has shape {np.shape(array)}, the sample {np.shape(sample)}")


class SigmaScheduler(Scheduler):
    """Schedulers in k-diffusion's sigma space, x = x0 + sigma * eps: euler, euler_a and lms.

    ``sigmas`` holds one float32 sigma per timestep plus the final one the last step lands on.
    """

    _timestep_dtype = np.float32
    # diffusers' timesteps even where they repeat or pass the table (an interval of length 0: a step that does
    # nothing); a scheduler that cannot step such an interval (LMS) takes within_table's instead
    _repeats_allowed: ClassVar[bool] = True

    def __init__(self, config: Mapping[str, Any], **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.sigmas = np.append(train_sigmas(self.alphas_cumprod)[::-1], np.float32(0))

    @property  # type: ignore[override]
    def init_noise_sigma(self) -> float:
        sigma_max = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(sigma_max)
        return float(np.sqrt(sigma_max * sigma_max + np.float32(1)))

    def _set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n = num_inference_steps
        spacing, offset = cfg["timestep_spacing"], cfg["steps_offset"]
        timesteps = spaced_timesteps(spacing, n, self.num_train_timesteps, offset).astype(np.float32)
        if not self._repeats_allowed:
            timesteps = within_table(timesteps, self.num_train_timesteps).astype(np.float32)
        table = train_sigmas(self.alphas_cumprod)
        log_table = np.log(table)
        if cfg.get("interpolation_type") == "log_linear":
            # As diffusers: n + 1 sigmas log-spaced over the whole training range, plus the final sigma.
            sigmas = np.exp(np.linspace(np.log(table[-1]), np.log(table[0]), n + 1))
        else:
            sigmas = np.interp(timesteps, np.arange(len(table)), table)
        if cfg.get("use_karras_sigmas"):
            lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
            sigmas = karras_sigmas(float(sigmas[-1]) if lo is None else lo, float(sigmas[0]) if hi is None else hi, n)
            timesteps = sigma_to_t(sigmas, log_table).astype(np.float32)
        self.sigmas = np.append(sigmas, final_sigma(cfg, self.alphas_cumprod)).astype(np.float32)
        self.timesteps = timesteps

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        """sample / sqrt(sigma**2 + 1): the UNet sees unit-variance input."""
        self._check_index(step_index)
        sigma = float(self.sigmas[step_index])
        return (np.asarray(sample, dtype=np.float64) / np.sqrt(sigma**2 + 1.0)).astype(np.float32)

    def _noise_level(self, step_index: int) -> tuple[float, float]:
        return 1.0, float(self.sigmas[step_index])

    def _predict_x0(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        sigma = float(self.sigmas[step_index])
        alpha, sigma_vp = vp_coefficients(sigma)
        return predict_x0(self.prediction_type, model_output, sample * alpha, alpha, sigma_vp)
