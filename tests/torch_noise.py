"""The noise the parity tests share with diffusers: torch's draws, replayed through NumPy's interface."""

from __future__ import annotations

import numpy as np
import torch


class TorchNoise:
    """A NumPy-Generator look-alike that replays torch.randn draws from a seeded torch.Generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype) -> np.ndarray:
        return torch.randn(size, generator=self.generator, dtype=torch.float32).numpy()
