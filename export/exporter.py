"""Export a diffusers Stable Diffusion model folder to an sdtrt artifact folder (ONNX + manifest)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from sdtrt.engine.errors import ExportError, SdtrtError
from sdtrt.engine.fsutil import atomic_dir, onnx_digest, onnx_files, replace_refusal, sha256_file, sha256_tree
from sdtrt.engine.manifest import (
    PRECISIONS,
    TOKENIZER_FILES,
    Component,
    ComponentFile,
    Manifest,
    file_records,
)
from sdtrt.engine.network_facts import EXPORTED, TEXT_ENCODERS
from sdtrt.engine.version import VERSION
from sdtrt.export import ort_fusion, single_file, wrappers
from sdtrt.export.chatter import held_back
from sdtrt.export.onnx_export import (
    DEFAULT_OPSET,
    MAX_OPSET,
    MIN_OPSET,
    convert_fp16,
    export_fp32,
)
from sdtrt.export.ownership import export_refusal
from sdtrt.export.pickles import safetensors_only
from sdtrt.export.weight_map import map_path

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SD_PIPELINES = {
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
    "LatentConsistencyModelPipeline",
}
SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
UPSCALER_PIPELINE = "StableDiffusionUpscalePipeline"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# the model folders an export reads (their contents make up the source hash)
SOURCE_PARTS = (
    "model_index.json",
    "scheduler",
    "low_res_scheduler",
    *TEXT_ENCODERS.values(),
    *TEXT_ENCODERS,
    "unet",
    "vae",
)


def resolve_model_folder(model: str | os.PathLike[str]) -> Path:
    """A local diffusers folder as is; a hub id ("org/name") through a download where there is network."""
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ExportError(f"{path} is not a diffusers model folder (no model_index.json)")
        return path
    if path.exists():
        raise ExportError(f"{path} is a file, not a diffusers folder (export_model converts single-file checkpoints)")
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
    """The model family, from the pipeline class and the networks' configs; unsupported ones are an error.

    ``text_encoder_config`` is the first text encoder's (SDXL refiners have only text_encoder_2).
    """
    pipeline = model_index.get("_class_name", "?")
    in_channels = unet_config.get("in_channels", 4)
    if pipeline == UPSCALER_PIPELINE:
        if in_channels != 7 or unet_config.get("num_class_embeds") is None:
            raise ExportError("an x4 upscaler needs a UNet of 7 input channels with noise-level class embeddings")
        return "upscaler"
    if in_channels not in (4, 9):
        raise ExportError(f"a Stable Diffusion UNet has 4 (or, inpainting, 9) input channels, not {in_channels}")
    if pipeline in SDXL_PIPELINES:
        return "sdxl"
    if pipeline in SD_PIPELINES:
        # SD 1.x uses OpenAI's CLIP ViT-L (quick_gelu), SD 2.x OpenCLIP ViT-H (gelu)
        return "sd1" if text_encoder_config.get("hidden_act") == "quick_gelu" else "sd2"
    raise ExportError(
        f"{pipeline} models are not supported (supported: Stable Diffusion 1.x, 2.x, XL, LCM and the x4 upscaler)"
    )


def _present(model_index: dict, source: Path, part: str) -> bool:
    """Whether the pipeline has ``part`` (SDXL refiners list text_encoder as null)."""
    entry = model_index.get(part)
    return bool(entry) and entry[0] is not None and (source / part).is_dir()


def export_model(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    precisions: Sequence[str] = ("fp32",),
    components: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    progress: bool = True,
    config: str | os.PathLike[str] | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
    ort_fused: bool = False,
) -> Manifest:
    """Export ``model`` to ``out_dir``; the folder appears only once complete.

    ``ort_fused`` also writes ONNX Runtime's fused graphs of the UNet and the VAE (export/ort_fusion.py):
    fp16 for its CUDA provider where ``precisions`` has fp16, the UNet's fp32 for its CPU one where fp32.

    ``model`` is a diffusers folder, a hub id or a single-file checkpoint; ``config`` and ``prediction_type``
    apply to checkpoints only (single_file.converted_checkpoint). Pickled weights (a checkpoint, or a folder's
    ``*.bin`` without safetensors) are read only with ``allow_pickle`` (export/pickles.py). ``components``
    defaults to every network the model's family uses.
    """
    bad = [p for p in precisions if p not in PRECISIONS] + [c for c in components or () if c not in EXPORTED]
    if bad or not precisions or (components is not None and not components):
        raise ExportError(f"unknown precision or component {bad} (precisions {PRECISIONS}, components {EXPORTED})")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"opset {opset} is not supported (use an ONNX opset from {MIN_OPSET} to {MAX_OPSET})")
    out_dir = Path(out_dir)
    if (why := replace_refusal(out_dir, overwrite, export_refusal)) is not None:
        raise ExportError(why)
    if Path(model).is_file():
        resolved = single_file.converted_checkpoint(
            model, out_dir, config=config, prediction_type=prediction_type, allow_pickle=allow_pickle
        )
    elif config is not None or prediction_type is not None:
        raise ExportError("--config and --prediction-type apply to single-file checkpoints only")
    else:
        folder = resolve_model_folder(model)
        resolved = contextlib.nullcontext((folder, {"path": str(Path(model)), "sha256": source_hash(folder)}))
    with held_back(), resolved as (source, record):  # the libraries' chatter: shown only if it works
        return _export_folder(
            source,
            record,
            out_dir,
            precisions,
            components,
            opset,
            overwrite,
            progress,
            ort_fused=ort_fused,
            allow_pickle=allow_pickle,
        )


def _export_folder(
    source: Path,
    record: dict[str, str],
    out_dir: Path,
    precisions: Sequence[str],
    components: Sequence[str] | None,
    opset: int,
    overwrite: bool,
    progress: bool,
    ort_fused: bool = False,
    allow_pickle: bool = False,
) -> Manifest:
    """Export the diffusers folder ``source``; ``record`` is the manifest's note of where it came from."""
    import diffusers
    import transformers

    model_index = _read_json(source / "model_index.json")
    scheduler_config = _read_json(source / "scheduler" / "scheduler_config.json")
    encoder_names = [name for name in TEXT_ENCODERS if _present(model_index, source, name)]
    if not encoder_names:
        raise ExportError(f"{source} has no text encoder")
    text_configs = {name: _read_json(source / name / "config.json") for name in encoder_names}
    unet_config = _read_json(source / "unet" / "config.json")
    vae_config = _read_json(source / "vae" / "config.json")
    family = detect_family(model_index, text_configs[encoder_names[0]], unet_config)
    low_res_scheduler = None
    if family == "upscaler":
        low_res_scheduler = _read_json(source / "low_res_scheduler" / "scheduler_config.json")

    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    text_encoders = tuple(
        wrappers.TextEncoderGeometry(
            name=name,
            hidden_size=int(config["hidden_size"]),
            # SDXL reads the penultimate layer of both encoders, and the second one's pooled projection
            hidden_layer="penultimate" if family == "sdxl" else "last",
            vocab_size=int(config.get("vocab_size", 49408)),  # the trace's ids stay below it; CLIPTextConfig's default
            pooled_size=int(config["projection_dim"]) if family == "sdxl" and name == "text_encoder_2" else None,
        )
        for name, config in text_configs.items()
    )
    geometry = wrappers.Geometry(
        text_max_length=int(text_configs[encoder_names[0]]["max_position_embeddings"]),
        text_encoders=text_encoders,
        latent_channels=int(vae_config.get("latent_channels", 4)),
        vae_scale_factor=vae_scale,
        size_multiple=vae_scale * 2 ** (len(unet_config["block_out_channels"]) - 1),
        default_size=int(unet_config["sample_size"]) * vae_scale,
        unet_in_channels=int(unet_config.get("in_channels", 4)),
        unet_class_labels=int(unet_config["num_class_embeds"]) if family == "upscaler" else None,
        time_ids=(5 if model_index.get("requires_aesthetics_score") else 6) if family == "sdxl" else 0,
        time_cond_size=unet_config.get("time_cond_proj_dim"),
    )
    unet_spec = wrappers.unet_spec(geometry)
    encoders = {t.name: t for t in text_encoders}
    specs = {t.name: wrappers.text_encoder_spec(geometry, t) for t in text_encoders}
    specs |= {
        "unet": unet_spec,
        "vae_decoder": wrappers.vae_decoder_spec(geometry),
        "vae_encoder": wrappers.vae_encoder_spec(geometry),
    }

    # safetensors only unless pickles are allowed: checked for every part before anything loads
    weights = {part: safetensors_only(source / part, allow_pickle) for part in (*encoder_names, "unet", "vae")}

    @functools.cache
    def load_vae() -> torch.nn.Module:  # one load for both vae_decoder and vae_encoder
        return diffusers.AutoencoderKL.from_pretrained(source / "vae", **weights["vae"])

    def load(name: str) -> torch.nn.Module:
        if name in text_configs:
            encoder_class = getattr(transformers, model_index[name][1])  # CLIPTextModel(WithProjection)
            encoder = encoder_class.from_pretrained(source / name, **weights[name])
            return wrappers.TextEncoderNet(encoder, encoders[name])
        if name == "unet":
            extra = tuple(s.name for s in unet_spec.inputs[3:])
            unet = diffusers.UNet2DConditionModel.from_pretrained(source / "unet", **weights["unet"])
            return wrappers.UNetNet(unet, extra)
        vae = load_vae()
        return wrappers.VaeDecoderNet(vae) if name == "vae_decoder" else wrappers.VaeEncoderNet(vae)

    if components is None:
        components = [*encoder_names, "unet", "vae_decoder"] + ([] if family == "upscaler" else ["vae_encoder"])
    missing = [name for name in components if name not in specs]
    if missing:
        raise ExportError(f"{source} has no {', '.join(missing)} to export")
    exported: dict[str, Component] = {}
    with atomic_dir(out_dir, overwrite=overwrite, replaceable=export_refusal) as staging:
        steps = tqdm(components, desc="export", unit="network", disable=not progress)
        for name in steps:
            steps.set_postfix_str(name)
            try:
                fused: dict[str, ComponentFile] = {}  # ONNX Runtime's graphs, made from the plain fp32 file
                upcast = name == "unet" and bool(unet_config.get("upcast_attention"))
                fuse = functools.partial(_export_fused, into=fused, upcast_attention=upcast) if ort_fused else None
                files = _export_network(load(name), specs[name], staging, precisions, opset, fuse)
            except (SdtrtError, ModuleNotFoundError):  # already one line; a missing package is the CLI's to explain
                raise
            except Exception as exc:  # torch, diffusers, onnx: a long message and a deep traceback (see --debug)
                raise ExportError(f"exporting {name} failed: {_one_line(exc)}") from exc
            exported[name] = Component(files=files, ort_fused=fused)
            log.info("exported %s (%s)", name, ", ".join([*files, *(f"{p} ORT-fused" for p in fused)]))
        for name in encoder_names:
            tokenizer_dir = staging / TEXT_ENCODERS[name]
            tokenizer_dir.mkdir()
            for file in TOKENIZER_FILES:
                if (source / TEXT_ENCODERS[name] / file).is_file():
                    shutil.copy2(source / TEXT_ENCODERS[name] / file, tokenizer_dir / file)
        manifest = Manifest(
            format_version=1,
            sdtrt_version=VERSION,
            source=record,
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
            force_zeros_for_empty_prompt=bool(model_index.get("force_zeros_for_empty_prompt", False)),
            scheduler=scheduler_config,
            low_res_scheduler=low_res_scheduler,
            tokenizers={name: TEXT_ENCODERS[name] for name in encoder_names},
            components=exported,
        )
        manifest = replace(manifest, checksums=file_records(staging, manifest.read_files()))
        manifest.save(staging)
    return manifest


def _export_network(
    module: torch.nn.Module,
    spec: wrappers.NetworkSpec,
    staging: Path,
    precisions: Sequence[str],
    opset: int,
    fuse: Callable[[Path, wrappers.NetworkSpec, Path, Sequence[str]], None] | None = None,
) -> dict[str, ComponentFile]:
    """Write one network's ONNX files at ``precisions`` into ``staging``; returns them by precision.

    ``fuse`` is called with the fp32 file, the spec, ``staging`` and ``precisions`` while the fp32 file is
    there (an export without fp32 removes it after)."""
    fp32_path = staging / f"{spec.name}.onnx"
    export_fp32(module.float(), spec, fp32_path, opset=opset)  # traces under no_grad
    files: dict[str, ComponentFile] = {}
    if "fp16" in precisions:
        fp16_path = staging / f"{spec.name}.fp16.onnx"
        convert_fp16(fp32_path, spec, fp16_path)
        files["fp16"] = _component_file(fp16_path, spec, "fp16")
    if fuse is not None:
        fuse(fp32_path, spec, staging, precisions)
    if "fp32" in precisions:
        files["fp32"] = _component_file(fp32_path, spec, "fp32")
    else:
        for file in onnx_files(fp32_path):
            file.unlink()
        map_path(fp32_path).unlink(missing_ok=True)
    return files


def _export_fused(
    fp32_path: Path,
    spec: wrappers.NetworkSpec,
    staging: Path,
    precisions: Sequence[str],
    *,
    into: dict[str, ComponentFile],
    upcast_attention: bool,
) -> None:
    """Write ONNX Runtime's fused graphs of the plain ``fp32_path`` into ``staging`` and their entries ``into``
    by precision (none for a network it does not fuse): the CUDA provider's at fp16, the CPU provider's at fp32,
    as ``precisions`` ask."""
    kind = ort_fusion.fused_kind(spec.name)
    if kind is None:
        return
    targets = {"fp16": "gpu"} if "fp16" in precisions else {}
    if kind in ort_fusion.CPU_FUSED and "fp32" in precisions:
        targets["fp32"] = "cpu"
    for precision, target in targets.items():
        path = staging / f"{spec.name}.ort{'.fp16' if precision == 'fp16' else ''}.onnx"
        report = ort_fusion.fuse(fp32_path, spec, target, path, upcast_attention=upcast_attention)
        into[precision] = replace(_component_file(path, spec, precision), fusion=report.to_dict())


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one short line: its type and the first line of its message."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _component_file(path: Path, spec: wrappers.NetworkSpec, precision: str) -> ComponentFile:
    inputs, outputs = spec.io_specs(precision)
    weights = map_path(path)  # networks LoRA changes have one (export/weight_map.py)
    sizes = [file.stat().st_size for file in onnx_files(path)]  # the .onnx, then its external data if any
    return ComponentFile(
        path=path.name,
        sha256=onnx_digest(path),
        inputs=inputs,
        outputs=outputs,
        weights=weights.name if weights.is_file() else None,
        size=sizes[0],
        data_size=sizes[1] if len(sizes) > 1 else None,
    )
