"""Attach a tiny VAE (diffusers ``AutoencoderTiny``: TAESD for SD 1.x/2.x, TAESDXL for SDXL) to an export.

``attach_tiny_vae(folder, source)`` writes ``vae_decoder_tiny.onnx`` and ``vae_encoder_tiny.onnx`` (at the
precisions the export's VAE decoder has) and records the source in the manifest; a request then decodes (and
img2img encodes) with it when it asks for ``vae="tiny"``. The tiny VAE works on the latents as the UNet sees
them: its scaling factor (1 for TAESD) is part of its graphs, so the decoder takes the UNet's latents and the
encoder returns them, as diffusers' pipelines use an AutoencoderTiny (no posterior sample: the encoder is exact).

A tiny VAE for another latent space is refused in one line: other latent channels or down-sampling than the
export's VAE (TAESD3, TAEF1), or a name that says it was distilled for another family (TAESDXL on an SD 1.x
export, TAESD on an SDXL one: their configs are the same, only their weights differ). Only .safetensors weights
load: sdtrt runs no pickles.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sdtrt.engine.errors import ExportError, SdtrtError
from sdtrt.engine.fsutil import scratch_dir, sha256_tree
from sdtrt.engine.manifest import Manifest, load_manifest
from sdtrt.engine.session import TensorSpec
from sdtrt.export import exporter
from sdtrt.export.attach import export_network, move_in
from sdtrt.export.onnx_export import DEFAULT_OPSET
from sdtrt.export.wrappers import NetworkSpec

log = logging.getLogger(__name__)

DECODER, ENCODER = "vae_decoder_tiny", "vae_encoder_tiny"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# what a tiny VAE's name says it was distilled for: madebyollin's taesdxl, taesd (SD 1.x and 2.x share a VAE)
NAMED_FAMILIES = ((re.compile(r"taesdxl"), ("sdxl",)), (re.compile(r"taesd(?![a-z0-9])"), ("sd1", "sd2")))
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


class TinyDecoderNet(torch.nn.Module):
    """The UNet's latents -> image in [-1, 1] (diffusers: ``vae.decode(latents / vae.config.scaling_factor)``)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


class TinyEncoderNet(torch.nn.Module):
    """Image in [-1, 1] -> the UNet's latents (diffusers: ``vae.config.scaling_factor * vae.encode(image)``)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image, return_dict=False)[0] * self.vae.config.scaling_factor


def tiny_vae_specs(manifest: Manifest) -> tuple[NetworkSpec, NetworkSpec]:
    """The decoder's and the encoder's inputs and outputs: as the full VAE's, the latents in the UNet's scale."""
    latents = TensorSpec("latents", "float32", ("batch", manifest.latent_channels, "latent_height", "latent_width"))
    image = TensorSpec("image", "float32", ("batch", 3, "height", "width"))
    f = manifest.vae_scale_factor
    side = manifest.default_height // f
    decoder = NetworkSpec(DECODER, (latents,), (image,), {"batch": 1, "latent_height": side, "latent_width": side})
    encoder = NetworkSpec(ENCODER, (image,), (latents,), {"batch": 1, "height": side * f, "width": side * f})
    return decoder, encoder


def attach_tiny_vae(
    folder: str | os.PathLike[str],
    source: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    opset: int = DEFAULT_OPSET,
) -> Manifest:
    """Export the diffusers AutoencoderTiny folder ``source`` into the export ``folder`` as ``vae_decoder_tiny``
    and ``vae_encoder_tiny``. An attached tiny VAE is replaced only with ``overwrite``. Nothing in ``folder``
    changes unless all of it works."""
    folder, source = Path(folder), Path(source)
    manifest = load_manifest(folder)
    if manifest.family not in FAMILY_NAMES:
        family = manifest.family
        raise ExportError(f"a tiny VAE attaches to SD 1.x, 2.x and XL exports; {folder} holds a {family} model")
    if manifest.tiny_vae is not None and not overwrite:
        raise ExportError(f"{folder} has a tiny VAE already: pass --overwrite to replace it")
    config = _read_config(source)
    check_family(manifest, config, source, folder)
    vae = _load(source)
    precisions = tuple(sorted(manifest.components["vae_decoder"].files))
    with scratch_dir(folder, ".tiny-vae") as staging:
        components = dict(manifest.components)
        for module, spec in zip((TinyDecoderNet(vae), TinyEncoderNet(vae)), tiny_vae_specs(manifest), strict=True):
            components[spec.name] = export_network(module, spec, staging, precisions, opset)
        record = {"path": str(source), "sha256": sha256_tree(source)}
        updated = replace(manifest, components=components, tiny_vae={"source": record})
        move_in(staging, folder, "the tiny VAE's")
        updated.save(folder)
    log.info("attached the tiny VAE %s to %s", source, folder)
    return updated


def check_family(manifest: Manifest, config: dict[str, Any], source: Path, folder: Path) -> None:
    """One ExportError line when the tiny VAE of ``config`` (named ``source``) decodes another latent space than
    the export's."""
    ours = FAMILY_NAMES[manifest.family]
    hint = "(TAESD for SD 1.x/2.x, TAESDXL for SDXL)"
    channels = config.get("latent_channels")
    if channels != manifest.latent_channels:
        raise ExportError(
            f"{source} is a tiny VAE for another model family: its latents have {channels} channels, the "
            f"{ours} export {folder}'s {manifest.latent_channels} {hint}"
        )
    blocks = config.get("num_decoder_blocks", ())
    scale = int(config.get("upsampling_scaling_factor", 2)) ** max(len(blocks) - 1, 0)
    if scale != manifest.vae_scale_factor:
        raise ExportError(
            f"{source} is a tiny VAE for another model family: it up-samples latents {scale}x, the {ours} "
            f"export {folder}'s VAE {manifest.vae_scale_factor}x {hint}"
        )
    name = f"{source.name} {config.get('_name_or_path', '')}".lower()
    for pattern, families in NAMED_FAMILIES:
        if pattern.search(name):
            if manifest.family not in families:
                theirs = "/".join(FAMILY_NAMES[f] for f in families)
                raise ExportError(f"{source} is a tiny VAE for {theirs} models; {folder} holds an {ours} model {hint}")
            return


def _read_config(source: Path) -> dict[str, Any]:
    if not (source / "config.json").is_file():
        raise ExportError(f"{source} is not a diffusers AutoencoderTiny folder (no config.json)")
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{source}/config.json is not readable JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderTiny":
        named = config.get("_class_name") if isinstance(config, dict) else None
        raise ExportError(f"{source} is not a diffusers AutoencoderTiny folder (its config names {named!r})")
    if not (source / WEIGHTS).is_file():
        raise ExportError(
            f"{source} has no {WEIGHTS}: sdtrt loads no pickled weights (.bin); save the model with "
            "safe_serialization=True"
        )
    return config


def _load(source: Path) -> torch.nn.Module:
    from diffusers import AutoencoderTiny

    try:
        return AutoencoderTiny.from_pretrained(source, use_safetensors=True).eval()
    except SdtrtError:
        raise
    except Exception as exc:  # diffusers, safetensors: many types, long messages
        raise ExportError(f"cannot load the tiny VAE {source}: {exporter._one_line(exc)}") from exc
