"""manifest.json: the contract between the export stage, the engines and the runtime.

The manifest is versioned and validated on load; a mismatch is a clear error, never a guess.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrt.engine.errors import ManifestError
from sdtrt.engine.fsutil import write_json_atomic
from sdtrt.engine.networks import COMPONENTS
from sdtrt.engine.session import TensorSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAMILIES = ("sd1", "sd2", "sdxl", "upscaler")
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class ComponentFile:
    """One ONNX file of a component at one precision."""

    path: str  # relative to the artifact folder
    sha256: str  # of the .onnx file and its external data, in that order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # networks LoRA may change (UNet, text encoders): their weight map (engine/weights.py), relative path
    weights: str | None = None

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "weights": self.weights,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> ComponentFile:
        return cls(
            path=str(d["path"]),
            sha256=str(d["sha256"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            weights=None if d.get("weights") is None else str(d["weights"]),
        )


@dataclass(frozen=True)
class Component:
    """A network of the pipeline: its files per precision.

    Its inputs name their dynamic dimensions ("batch", "latent_height", ...); the engine derives
    their ranges from a profile (engine/profiles.py: component_dims), so the manifest holds none.
    """

    files: dict[str, ComponentFile]

    def to_dict(self) -> dict:
        return {"files": {p: f.to_dict() for p, f in self.files.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> Component:
        # Older exports also wrote a "profile" of (min, opt, max) per dynamic dimension, before the
        # engine became the one source of profiles: it is ignored, and format_version stays 1,
        # since nothing a reader needs changed.
        files = {str(p): ComponentFile.from_dict(f) for p, f in d["files"].items()}
        for precision in files:
            if precision not in PRECISIONS:
                raise ValueError(f"unknown precision {precision!r}")
        return cls(files=files)


@dataclass(frozen=True)
class Manifest:
    family: str
    prediction_type: str  # "epsilon" | "v_prediction"
    vae_scaling_factor: float
    vae_scale_factor: int  # image pixels per latent pixel, per side (8 for Stable Diffusion)
    size_multiple: int  # height and width must be multiples of this (VAE and UNet down-sampling)
    latent_channels: int
    default_height: int
    default_width: int
    text_max_length: int
    scheduler: dict[str, Any]  # the model's scheduler config, "_class_name" included
    components: dict[str, Component]
    source: dict[str, str] = field(default_factory=dict)  # {"path": ..., "sha256": ...}
    unet_in_channels: int = 4  # 9: an inpainting UNet (latents + mask + masked image); 7: the x4 upscaler
    max_noise_level: int | None = None  # x4 upscaler: the largest noise_level its UNet was trained with
    low_res_scheduler: dict[str, Any] | None = None  # x4 upscaler: the config that noises the low-res image
    # text encoder -> its tokenizer folder (vocab.json + merges.txt), in the order their hidden states are
    # concatenated: {"text_encoder": "tokenizer"}, SDXL adds "text_encoder_2": "tokenizer_2"
    tokenizers: dict[str, str] = field(default_factory=lambda: {"text_encoder": "tokenizer"})
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt means zero embeddings, not ""
    sdtrt_version: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "sdtrt_version": self.sdtrt_version,
            "source": dict(self.source),
            "family": self.family,
            "prediction_type": self.prediction_type,
            "vae_scaling_factor": self.vae_scaling_factor,
            "vae_scale_factor": self.vae_scale_factor,
            "size_multiple": self.size_multiple,
            "latent_channels": self.latent_channels,
            "default_height": self.default_height,
            "default_width": self.default_width,
            "text_max_length": self.text_max_length,
            "unet_in_channels": self.unet_in_channels,
            "max_noise_level": self.max_noise_level,
            "scheduler": dict(self.scheduler),
            "low_res_scheduler": self.low_res_scheduler,
            "tokenizers": dict(self.tokenizers),
            "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt,
            "components": {name: c.to_dict() for name, c in self.components.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Manifest:
        return cls(
            format_version=int(d["format_version"]),
            sdtrt_version=str(d.get("sdtrt_version", "")),
            source={str(k): str(v) for k, v in d["source"].items()},
            family=str(d["family"]),
            prediction_type=str(d["prediction_type"]),
            vae_scaling_factor=float(d["vae_scaling_factor"]),
            vae_scale_factor=int(d["vae_scale_factor"]),
            size_multiple=int(d["size_multiple"]),
            latent_channels=int(d["latent_channels"]),
            default_height=int(d["default_height"]),
            default_width=int(d["default_width"]),
            text_max_length=int(d["text_max_length"]),
            unet_in_channels=int(d["unet_in_channels"]),
            max_noise_level=None if d["max_noise_level"] is None else int(d["max_noise_level"]),
            scheduler=dict(d["scheduler"]),
            low_res_scheduler=None if d["low_res_scheduler"] is None else dict(d["low_res_scheduler"]),
            tokenizers={str(k): str(v) for k, v in d["tokenizers"].items()},
            force_zeros_for_empty_prompt=bool(d["force_zeros_for_empty_prompt"]),
            components={str(k): Component.from_dict(v) for k, v in d["components"].items()},
        )

    def component_file(self, component: str, precision: str) -> ComponentFile:
        if component not in self.components:
            raise ManifestError(f"this artifact folder has no {component} (it has {sorted(self.components)})")
        files = self.components[component].files
        if precision not in files:
            raise ManifestError(f"{component} was not exported at {precision} (it has {sorted(files)})")
        return files[precision]

    def save(self, folder: str | os.PathLike[str]) -> None:
        write_json_atomic(Path(folder) / MANIFEST_NAME, self.to_dict())


def load_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``folder/manifest.json``; any problem is one ManifestError line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"no artifact folder at {folder} (create one with: sdtrt export MODEL --out {folder})")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: it is not an sdtrt export (run: sdtrt export)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"corrupt manifest {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"corrupt manifest {path}: expected a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {version!r}; this sdtrt reads version {FORMAT_VERSION}: "
            "re-export the model with this version"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ManifestError(f"corrupt manifest {path}: {detail}") from None
    if manifest.family not in FAMILIES:
        raise ManifestError(f"{path}: model family {manifest.family!r} is not supported (known: {FAMILIES})")
    unknown = sorted(set(manifest.components) - set(COMPONENTS))
    if unknown:  # each network's batch rule, LoRA and fallback facts come from engine/networks.py
        raise ManifestError(f"{path}: unknown networks {unknown} (known: {', '.join(COMPONENTS)})")
    for component in manifest.components.values():
        for file in component.files.values():
            for named in (file.path, file.weights):
                if named is not None and not (folder / named).is_file():
                    raise ManifestError(f"{folder}: {named} named in the manifest is missing")
    return manifest
