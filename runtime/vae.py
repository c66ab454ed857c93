"""Which VAE a request decodes (and img2img encodes) with: the export's own, or its attached tiny one.

A tiny VAE (diffusers AutoencoderTiny: TAESD, attached by ``sdtrt add-tiny-vae``) decodes ~10x faster at a small
cost in detail; its graphs take and return the latents as the UNet sees them (export/tiny_vae.py).
"""

from __future__ import annotations

import os
import shlex

import numpy as np

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Manifest
from sdtrt.runtime.runner import NetworkRunner

VAES = ("full", "tiny")  # a request's ``vae`` option; "full" is the default
TINY_DECODER, TINY_ENCODER = "vae_decoder_tiny", "vae_encoder_tiny"


def check_vae(vae: str, manifest: Manifest, folder: str | os.PathLike[str]) -> None:
    """One InvalidInputError line when ``vae`` asks for a tiny VAE the export in ``folder`` does not have."""
    if vae == "tiny" and TINY_DECODER not in manifest.components:
        raise InvalidInputError(
            f"vae='tiny' needs a tiny VAE, which {folder} has none of: attach one with "
            f"`sdtrt add-tiny-vae {shlex.quote(str(folder))} TAESD_FOLDER` (a diffusers AutoencoderTiny)"
        )


def decode_latents(runner: NetworkRunner, manifest: Manifest, latents: np.ndarray, vae: str) -> np.ndarray:
    """(B, C, h, w) latents as the UNet sees them -> (B, 3, H, W) float32 image in [-1, 1], by ``vae``'s decoder."""
    if vae == "tiny":  # it takes the UNet's latents (export/tiny_vae.py)
        return runner.run(TINY_DECODER, latents=latents)
    return runner.run("vae_decoder", latent=latents / np.float32(manifest.vae_scaling_factor))
