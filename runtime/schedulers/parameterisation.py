"""Model parameterisations: x0, eps and v predictions converted into one another.

All in the variance-preserving form x_t = alpha * x0 + sigma * eps; the sigma-space schedulers convert first
with vp_coefficients.
"""

from __future__ import annotations

import numpy as np


def predict_x0(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha: float, sigma: float
) -> np.ndarray:
    """The denoised sample x0 for x_t = alpha * x0 + sigma * eps (the variance-preserving form).

    The sigma schedulers (x = x0 + sigma_ve * eps) call this with sample * alpha, alpha = 1 / sqrt(sigma_ve**2 + 1)
    and sigma = sigma_ve * alpha.
    """
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    return model_output  # "sample"


def predict_eps(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha: float, sigma: float
) -> np.ndarray:
    """The noise eps for x_t = alpha * x0 + sigma * eps, from the model output."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * sample
    return (sample - alpha * model_output) / sigma  # "sample"


def vp_coefficients(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the variance-preserving form for a sigma-space sigma."""
    alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha
