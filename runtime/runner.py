"""The seam between a generation and the sessions that run its networks.

Every network call of a generation (text encoders, UNet, ControlNets, VAE) goes through a ``NetworkRunner``.
By default that is the pipeline's own sessions (runtime/sessions.py); a server's dynamic batching passes one that
gathers several generations' UNet calls into one (runtime/batching.py), through ``Pipeline.execute(..., runner=)``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class NetworkRunner(Protocol):
    """Runs one network of the loaded model: float32 outputs by name, NaN and inf refused."""

    def run_all(self, network: str, **feeds: np.ndarray) -> dict[str, np.ndarray]: ...

    def run(self, network: str, **feeds: np.ndarray) -> np.ndarray:
        """A one-output network's output."""
        ...
