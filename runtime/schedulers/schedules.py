"""Noise schedules: betas, alphas_cumprod, training sigmas, timestep spacing, Karras sigmas, sigma -> timestep.

The tables that diffusers keeps as float32 torch tensors (betas, alphas_cumprod, sigmas) are float32 here too
and built the same way, so timesteps and sigmas come out the same as diffusers'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sdtrt.engine.errors import InvalidInputError


def make_betas(config: Mapping[str, Any]) -> np.ndarray:
    """The float32 betas diffusers builds from beta_schedule / trained_betas (and rescale_betas_zero_snr)."""
    n = int(config["num_train_timesteps"])
    schedule = config["beta_schedule"]
    if config["trained_betas"] is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
        if betas.shape != (n,):
            raise InvalidInputError(
                f"trained_betas has shape {betas.shape}, expected ({n},) for num_train_timesteps={n}"
            )
    elif schedule == "linear":
        betas = np.linspace(config["beta_start"], config["beta_end"], n).astype(np.float32)
    elif schedule == "scaled_linear":
        # Linear in sqrt(beta), squared in float32 as diffusers does.
        betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n).astype(np.float32) ** 2
    else:  # squaredcos_cap_v2: Nichol & Dhariwal's cosine alpha_bar, discretised, betas capped at 0.999.
        t = np.arange(n + 1) / n
        alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999).astype(np.float32)
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def cumprod_alphas(betas: np.ndarray) -> np.ndarray:
    """alphas_cumprod as torch.cumprod computes it on CPU: float32 alphas, float64 running product."""
    return np.cumprod((np.float32(1) - betas).astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last step has zero SNR."""
    root = np.sqrt(cumprod_alphas(betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return np.float32(1) - alphas


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) per training timestep (float32, ascending in t)."""
    return np.sqrt((np.float32(1) - alphas_cumprod) / alphas_cumprod)


def final_sigma(config: Mapping[str, Any], alphas_cumprod: np.ndarray) -> float:
    """The sigma the last step lands on: 0, or the smallest training sigma for final_sigmas_type=sigma_min."""
    if config.get("final_sigmas_type", "zero") == "sigma_min":
        return float(train_sigmas(alphas_cumprod[:1])[0])
    return 0.0


def spaced_timesteps(
    spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int, last_timestep: int | None = None
) -> np.ndarray:
    """Descending float64 timesteps for diffusers' timestep_spacing (table 2 of arXiv:2305.08891).

    ``linspace`` is left unrounded (the sigma schedulers keep fractional timesteps); ``last_timestep`` (default
    num_train_timesteps) is where DPM-Solver's lambda_min_clipped cuts the schedule.
    """
    last = num_train_timesteps if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(num_steps) * (last // num_steps))[::-1].astype(np.float64) + steps_offset
    return np.round(np.arange(last, 0, -num_train_timesteps / num_steps)) - 1  # trailing


def within_table(timesteps: np.ndarray, num_train_timesteps: int, last_timestep: int | None = None) -> np.ndarray:
    """Descending ``timesteps`` as they are where they are distinct training timesteps, else as many spread evenly
    from ``last_timestep`` - 1 (default num_train_timesteps - 1) down to 0.

    diffusers' spacings break only at the top of the step range (num_inference_steps near num_train_timesteps):
    leading spacing's steps_offset then pushes the first timestep past the last training timestep (an IndexError
    in DDIM and PNDM, a repeated sigma in LMS and DPM-Solver), and DPM-Solver's n + 1 rounded points repeat one.
    The even spread is the schedule those spacings aim at: at num_train_timesteps steps, every timestep once.
    """
    if len(timesteps) and timesteps.max() <= num_train_timesteps - 1 and np.all(np.diff(timesteps) < 0):
        return timesteps
    last = num_train_timesteps if last_timestep is None else last_timestep
    return np.round(np.linspace(last - 1, 0, len(timesteps)))


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma**(1/rho), from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas``: linear interpolation of t over the log-sigma table."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    # The last table entry at or below each sigma, kept one short of the end so high = low + 1 exists.
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)
