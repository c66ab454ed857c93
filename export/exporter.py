"""Export a diffusers Stable Diffusion model folder to an sdtrt artifact folder (ONNX + manifest)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

import sdtrt
from sdtrt.engine.errors import ExportError
from sdtrt.engine.fsutil import atomic_dir, sha256_file, sha256_tree
from sdtrt.engine.manifest import COMPONENTS, PRECISIONS, Component, ComponentFile, Manifest
from sdtrt.export import networks
from sdtrt.export.onnx_export import DEFAULT_OPSET, convert_fp16, export_fp32, onnx_digest, onnx_files

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
UPSCALER_PIPELINE = "StableDiffusionUpscalePipeline"
# networks exported when the caller names none: the x4 upscaler never encodes images
DEFAULT_COMPONENTS = {"sd1": COMPONENTS, "upscaler": ("text_encoder", "unet", "vae_decoder")}
SD1_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# the model folders an export reads (their contents make up the source hash)
SOURCE_PARTS = ("model_index.json", "scheduler", "low_res_scheduler", "tokenizer", "text_encoder", "unet", "vae")


def resolve_model_folder(model: str | os.PathLike[str]) -> Path:
    """A local diffusers folder as is; a hub id ("org/name") through a download where there is network."""
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ExportError(f"{path} is not a diffusers model folder (no model_index.json)")
        return path
    if path.exists():
        raise ExportError(f"{path} is a file; single-file checkpoints are not supported yet: give a diffusers folder")
    if not HUB_ID.match(str(model)):
        raise ExportError(f"no model folder at {path}")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
        return Path(snapshot_download(str(model), allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types: offline, not found, gated
        raise ExportError(f"could not fetch {model!r} from the Hugging Face hub: {type(exc).__name__}: {exc}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None


def detect_family(model_index: dict, text_encoder_config: dict, unet_config: dict) -> str:
    """The model family this export supports, from the pipeline class and the networks' configs."""
    pipeline = model_index.get("_class_name", "?")
    in_channels = unet_config.get("in_channels", 4)
    if pipeline == UPSCALER_PIPELINE:
        if in_channels != 7 or unet_config.get("num_class_embeds") is None:
            raise ExportError("an x4 upscaler needs a UNet of 7 input channels with noise-level class embeddings")
        return "upscaler"
    if pipeline not in SD1_PIPELINES:
        raise ExportError(f"{pipeline} models are not supported yet (supported: Stable Diffusion 1.x, x4 upscaler)")
    if text_encoder_config.get("hidden_act") != "quick_gelu":  # SD 2.x uses OpenCLIP (gelu)
        raise ExportError("Stable Diffusion 2.x models (OpenCLIP text encoder) are not supported yet")
    if in_channels not in (4, 9):
        raise ExportError(f"a Stable Diffusion UNet has 4 (or, inpainting, 9) input channels, not {in_channels}")
    return "sd1"


def export_model(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precisions: Sequence[str] = ("fp32",),
    components: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Export ``model`` to ``out_dir``; the folder appears only once complete.

    ``components`` defaults to every network the model's family uses.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    bad = [p for p in precisions if p not in PRECISIONS] + [c for c in components or () if c not in COMPONENTS]
    if bad or not precisions or (components is not None and not components):
        raise ExportError(f"unknown precision or component {bad} (precisions {PRECISIONS}, components {COMPONENTS})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir} already exists (use --overwrite to replace it)")
    source = resolve_model_folder(model)
    model_index = _read_json(source / "model_index.json")
    scheduler_config = _read_json(source / "scheduler" / "scheduler_config.json")
    text_config = _read_json(source / "text_encoder" / "config.json")
    unet_config = _read_json(source / "unet" / "config.json")
    vae_config = _read_json(source / "vae" / "config.json")
    family = detect_family(model_index, text_config, unet_config)
    components = DEFAULT_COMPONENTS[family] if components is None else tuple(components)
    low_res_scheduler = None
    if family == "upscaler":
        low_res_scheduler = _read_json(source / "low_res_scheduler" / "scheduler_config.json")

    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    geometry = networks.Geometry(
        text_max_length=int(text_config["max_position_embeddings"]),
        text_hidden_size=int(text_config["hidden_size"]),
        latent_channels=int(vae_config.get("latent_channels", 4)),
        vae_scale_factor=vae_scale,
        size_multiple=vae_scale * 2 ** (len(unet_config["block_out_channels"]) - 1),
        default_size=int(unet_config["sample_size"]) * vae_scale,
        unet_in_channels=int(unet_config.get("in_channels", 4)),
        unet_class_labels=family == "upscaler",
    )
    unet_net = networks.ClassLabelUNetNet if geometry.unet_class_labels else networks.UNetNet
    loaders = {
        "text_encoder": lambda: networks.TextEncoderNet(CLIPTextModel.from_pretrained(source / "text_encoder")),
        "unet": lambda: unet_net(UNet2DConditionModel.from_pretrained(source / "unet")),
        "vae_decoder": lambda: networks.VaeDecoderNet(AutoencoderKL.from_pretrained(source / "vae")),
        "vae_encoder": lambda: networks.VaeEncoderNet(AutoencoderKL.from_pretrained(source / "vae")),
    }
    specs = {
        "text_encoder": networks.text_encoder_spec,
        "unet": networks.unet_spec,
        "vae_decoder": networks.vae_decoder_spec,
        "vae_encoder": networks.vae_encoder_spec,
    }
    digest = source_hash(source)
    exported: dict[str, Component] = {}
    steps = tqdm(components, desc="export", unit="network", disable=not progress)
    with atomic_dir(out_dir, overwrite=overwrite) as staging, torch.no_grad():
        for name in steps:
            steps.set_postfix_str(name)
            spec = specs[name](geometry)
            fp32_path = staging / f"{name}.onnx"
            export_fp32(loaders[name]().float(), spec, fp32_path, opset=opset)
            files: dict[str, ComponentFile] = {}
            if "fp16" in precisions:
                fp16_path = staging / f"{name}.fp16.onnx"
                convert_fp16(fp32_path, spec, fp16_path)
                files["fp16"] = _component_file(fp16_path, spec, "fp16")
            if "fp32" in precisions:
                files["fp32"] = _component_file(fp32_path, spec, "fp32")
            else:
                for file in onnx_files(fp32_path):
                    file.unlink()
            exported[name] = Component(files=files, profile=dict(spec.profile))
            log.info("exported %s (%s)", name, ", ".join(files))
        tokenizer_dir = staging / "tokenizer"
        tokenizer_dir.mkdir()
        for file in TOKENIZER_FILES:
            if (source / "tokenizer" / file).is_file():
                shutil.copy2(source / "tokenizer" / file, tokenizer_dir / file)
        manifest = Manifest(
            format_version=1,
            sdtrt_version=sdtrt.__version__,
            source={"path": str(Path(model)), "sha256": digest},
            family=family,
            prediction_type=str(scheduler_config.get("prediction_type", "epsilon")),
            vae_scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
            vae_scale_factor=geometry.vae_scale_factor,
            size_multiple=geometry.size_multiple,
            latent_channels=geometry.latent_channels,
            default_height=geometry.default_size,
            default_width=geometry.default_size,
            text_max_length=geometry.text_max_length,
            unet_in_channels=geometry.unet_in_channels,
            max_noise_level=model_index.get("max_noise_level") if family == "upscaler" else None,
            scheduler=scheduler_config,
            low_res_scheduler=low_res_scheduler,
            components=exported,
        )
        manifest.save(staging)
    return manifest


def source_hash(source: Path) -> str:
    """One hash over the parts of a diffusers folder that an export reads."""
    digest = hashlib.sha256()
    for part in SOURCE_PARTS:
        path = source / part
        if path.is_dir():
            digest.update(f"{part}:{sha256_tree(path)}\n".encode())
        elif path.is_file():
            digest.update(f"{part}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _component_file(path: Path, spec: networks.NetworkSpec, precision: str) -> ComponentFile:
    inputs, outputs = spec.io_specs(precision)
    return ComponentFile(path=path.name, sha256=onnx_digest(path), inputs=inputs, outputs=outputs)
