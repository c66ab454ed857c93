"""manifest.json: the contract between the export stage, the engines and the runtime.

The manifest is versioned and validated on load; a mismatch is a clear error, never a guess.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrt.engine.errors import ManifestError
from sdtrt.engine.fsutil import data_file_name, sha256_file, write_json_atomic
from sdtrt.engine.network_facts import COMPONENTS, CONTROLNET_PREFIX, is_known_network
from sdtrt.engine.session import TensorSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAMILIES = ("sd1", "sd2", "sdxl", "upscaler")
PRECISIONS = ("fp32", "fp16")
# `sdtrt quantize`: OpenVINO IRs and ONNX Runtime QDQ graphs beside the ONNX files (export/quantize.py)
QUANTIZED_PRECISIONS = ("int8",)
# A serialized ONNX ModelProto starts with its field 1, ir_version: tag byte 0x08, then a small varint
# (protobuf writers put fields in number order; every .onnx an export writes starts 0x08 0x08).
ONNX_TAG = 0x08
# the files of a tokenizer folder the runtime reads (the first two always, the configs where present)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
IR_SUFFIX = ".xml"  # an OpenVINO IR: model.xml, its weights in model.bin
# the manifest's sizes that must be positive integers
POSITIVE_SIZES = (
    "vae_scale_factor",
    "size_multiple",
    "latent_channels",
    "default_height",
    "default_width",
    "text_max_length",
    "unet_in_channels",
)


@dataclass(frozen=True)
class ComponentFile:
    """One ONNX file of a component at one precision."""

    path: str  # relative to the artifact folder
    sha256: str  # of the .onnx file and its external data, in that order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # networks LoRA may change (UNet, text encoders): their weight map (engine/weights.py), relative path
    weights: str | None = None
    # bytes of the .onnx file and of its external data (None: it has none); older manifests record
    # neither (size None), and loading them skips the size check
    size: int | None = None
    data_size: int | None = None
    # an ONNX Runtime fused graph (export --ort-fused): what fused, export/ort_fusion.py FusionReport.to_dict
    fusion: dict[str, Any] | None = None
    # an OpenVINO IR made by `sdtrt quantize`: how (export/quantize.py QuantizationReport.to_dict)
    quantization: dict[str, Any] | None = None

    @property
    def data_path(self) -> str:
        """Where the export keeps this file's external data (weights), relative, when it has any: beside an
        .onnx file its name + ".data", beside an OpenVINO IR's .xml the .bin of the same stem."""
        return data_file_name(self.path)

    def expected_files(self) -> dict[str, int | None]:
        """The files this entry needs, relative, with their recorded sizes (None: not recorded)."""
        files: dict[str, int | None] = {self.path: self.size}
        if self.data_size is not None:
            files[self.data_path] = self.data_size
        if self.weights is not None:
            files[self.weights] = None
        return files

    def to_dict(self) -> dict:
        return (
            {
                "path": self.path,
                "sha256": self.sha256,
                "size": self.size,
                "data_size": self.data_size,
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "weights": self.weights,
            }
            | ({} if self.fusion is None else {"fusion": dict(self.fusion)})
            | ({} if self.quantization is None else {"quantization": dict(self.quantization)})
        )

    @classmethod
    def from_dict(cls, d: Mapping) -> ComponentFile:
        return cls(
            path=str(d["path"]),
            sha256=str(d["sha256"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            weights=None if d.get("weights") is None else str(d["weights"]),
            size=None if d.get("size") is None else int(d["size"]),
            data_size=None if d.get("data_size") is None else int(d["data_size"]),
            fusion=None if d.get("fusion") is None else dict(d["fusion"]),
            quantization=None if d.get("quantization") is None else dict(d["quantization"]),
        )


@dataclass(frozen=True)
class Component:
    """A network of the pipeline: its files per precision.

    Its inputs name their dynamic dimensions ("batch", "latent_height", ...); the engine derives
    their ranges from a profile (engine/profiles.py: component_dims), so the manifest holds none.
    """

    files: dict[str, ComponentFile]
    # ONNX Runtime's fused graphs by precision (export --ort-fused): "fp16" for its CUDA provider, "fp32"
    # for its CPU one. A key of its own, so that readers from before it still read the manifest (format 1)
    ort_fused: dict[str, ComponentFile] = field(default_factory=dict)
    # OpenVINO IRs by precision (`sdtrt quantize --int8`: "int8"), which only the openvino backend runs; a key
    # of its own too
    openvino: dict[str, ComponentFile] = field(default_factory=dict)
    # ONNX Runtime's quantized graphs by precision (`sdtrt quantize --int8`: the UNet's static QDQ "int8"), which
    # only the ort-cpu backend runs; a key of its own too
    onnxruntime: dict[str, ComponentFile] = field(default_factory=dict)

    def all_files(self) -> list[ComponentFile]:
        """The plain files, then the fused ones, then the OpenVINO IRs, then ONNX Runtime's quantized graphs."""
        return [*self.files.values(), *self.ort_fused.values(), *self.openvino.values(), *self.onnxruntime.values()]

    def int8_files(self, backend: str) -> dict[str, ComponentFile]:
        """The quantized files ``backend`` runs by precision ("int8"): openvino's IRs, ort-cpu's QDQ graphs."""
        return {"openvino": self.openvino, "ort-cpu": self.onnxruntime}.get(backend, {})

    def to_dict(self) -> dict:
        fused = {"ort_fused": {p: f.to_dict() for p, f in self.ort_fused.items()}} if self.ort_fused else {}
        ir = {"openvino": {p: f.to_dict() for p, f in self.openvino.items()}} if self.openvino else {}
        ort = {"onnxruntime": {p: f.to_dict() for p, f in self.onnxruntime.items()}} if self.onnxruntime else {}
        return {"files": {p: f.to_dict() for p, f in self.files.items()}} | fused | ir | ort

    @classmethod
    def from_dict(cls, d: Mapping) -> Component:
        # Older exports also wrote a "profile" of (min, opt, max) per dynamic dimension, before the
        # engine became the one source of profiles: it is ignored, and format_version stays 1,
        # since nothing a reader needs changed.
        files = {str(p): ComponentFile.from_dict(f) for p, f in d["files"].items()}
        fused = {str(p): ComponentFile.from_dict(f) for p, f in d.get("ort_fused", {}).items()}
        ir = {str(p): ComponentFile.from_dict(f) for p, f in d.get("openvino", {}).items()}
        ort = {str(p): ComponentFile.from_dict(f) for p, f in d.get("onnxruntime", {}).items()}
        for precision in (*files, *fused):
            if precision not in PRECISIONS:
                raise ValueError(f"unknown precision {precision!r}")
        if unknown := sorted((set(ir) | set(ort)) - set(QUANTIZED_PRECISIONS)):
            raise ValueError(f"unknown quantized precision {unknown[0]!r}")
        return cls(files=files, ort_fused=fused, openvino=ir, onnxruntime=ort)


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
    # attached ControlNets by name (their network: "controlnet.<name>"): {"source": {"path", "sha256"},
    # "global_pool_conditions": bool}; older manifests have none
    controlnets: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the other files the runtime reads (read_files: tokenizers, weight maps) by relative path: {"size": bytes,
    # "sha256": hex}, for `sdtrt verify`; older manifests have none
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the attached tiny VAE (vae_decoder_tiny / vae_encoder_tiny): {"source": {"path", "sha256"}, "family"}
    tiny_vae: dict[str, Any] | None = None
    # the attached step-cache graphs (unet_cache / unet_shallow): {"branch": DeepCache's cache_branch_id}
    step_cache: dict[str, Any] | None = None
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
            "controlnets": {name: dict(facts) for name, facts in self.controlnets.items()},
            "checksums": {path: dict(record) for path, record in self.checksums.items()},
        } | {key: dict(value) for key in ("tiny_vae", "step_cache") if (value := getattr(self, key)) is not None}

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
            controlnets={str(k): dict(v) for k, v in d.get("controlnets", {}).items()},
            checksums={
                str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in d.get("checksums", {}).items()
            },
            tiny_vae=None if d.get("tiny_vae") is None else dict(d["tiny_vae"]),
            step_cache=None if d.get("step_cache") is None else dict(d["step_cache"]),
        )

    def read_files(self) -> list[str]:
        """Beside the networks' ONNX files (their sha256 in ``components``), the files the runtime reads, relative:
        its tokenizers' files (those that exist) and the weight maps. ``checksums`` records them."""
        tokenizers = [f"{folder}/{name}" for folder in self.tokenizers.values() for name in TOKENIZER_FILES]
        maps = [file.weights for c in self.components.values() for file in c.all_files() if file.weights is not None]
        return sorted({*tokenizers, *maps})

    def component_file(self, component: str, precision: str, fused: bool = False) -> ComponentFile:
        """The file of ``component`` at ``precision``: the plain graph, or ONNX Runtime's fused one."""
        if component not in self.components:
            raise ManifestError(f"this artifact folder has no {component} (it has {sorted(self.components)})")
        files = self.components[component].ort_fused if fused else self.components[component].files
        if precision not in files:
            what = "has no ONNX Runtime fused graph" if fused else "was not exported"
            raise ManifestError(f"{component} {what} at {precision} (it has {sorted(files)})")
        return files[precision]

    def save(self, folder: str | os.PathLike[str]) -> None:
        write_json_atomic(Path(folder) / MANIFEST_NAME, self.to_dict())

    def damaged(self, folder: str | os.PathLike[str], problem: str) -> ManifestError:
        """The one error for a problem with this export in ``folder``: it names the command that rebuilds it."""
        return damaged_export(folder, self.source.get("path"), problem)

    def size_problem(self) -> str | None:
        """What is wrong with the manifest's numbers (sizes, factors, tensor shapes), or None."""
        for name in POSITIVE_SIZES:
            if (value := getattr(self, name)) <= 0:
                return f"{name} is {value}, not a positive number"
        if self.size_multiple % self.vae_scale_factor:
            return f"size_multiple {self.size_multiple} is not a multiple of vae_scale_factor {self.vae_scale_factor}"
        for name in ("default_height", "default_width"):
            if (value := getattr(self, name)) % self.vae_scale_factor:
                return f"{name} {value} is not a multiple of vae_scale_factor {self.vae_scale_factor}"
        if not (math.isfinite(self.vae_scaling_factor) and self.vae_scaling_factor > 0):
            return f"vae_scaling_factor is {self.vae_scaling_factor}, not a positive number"
        if self.max_noise_level is not None and self.max_noise_level < 0:
            return f"max_noise_level is {self.max_noise_level}, not >= 0"
        for name, component in self.components.items():
            for file in component.all_files():
                for spec in (*file.inputs, *file.outputs):
                    if not all(isinstance(d, str) or (type(d) is int and d > 0) for d in spec.shape):
                        return f"{name}: {spec.name} has shape {list(spec.shape)} (sizes must be positive integers)"
        return None


def file_records(folder: str | os.PathLike[str], paths: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The manifest's ``checksums`` of those of ``paths`` (relative to ``folder``) that exist."""
    folder = Path(folder)
    return {
        path: {"size": (folder / path).stat().st_size, "sha256": sha256_file(folder / path)}
        for path in paths
        if (folder / path).is_file()
    }


def rebuild_command(folder: str | os.PathLike[str], source: str | None = None) -> str:
    """The command that writes the export in ``folder`` again from its model (MODEL where none is known)."""
    return f"sdtrt export {shlex.quote(source or 'MODEL')} --out {shlex.quote(str(folder))} --overwrite"


def damaged_export(folder: str | os.PathLike[str], source: str | None, problem: str) -> ManifestError:
    """One ManifestError line: ``problem`` (naming the file), then the command that rebuilds the export."""
    return ManifestError(f"{problem}; rebuild the export with: {rebuild_command(folder, source)}")


def file_problems(folder: Path, file: ComponentFile) -> list[str]:
    """What a cheap look finds wrong with the files of ``file`` in ``folder`` (stat and a few bytes, no hash):
    missing, empty, another size than recorded, an .onnx that does not start as ONNX. One line each."""
    problems = []
    for named, size in file.expected_files().items():
        path = folder / named
        if not path.is_file():
            problems.append(f"{path} named in the manifest is missing")
        elif (actual := path.stat().st_size) == 0:
            problems.append(f"{path} is empty")
        elif size is not None and actual != size:
            problems.append(f"{path} is {actual} bytes, not the {size} the export wrote (truncated or replaced)")
        elif named == file.path and not _model_header(path):
            what = "an OpenVINO IR" if path.suffix == IR_SUFFIX else "an ONNX model"
            problems.append(f"{path} is not {what} (it does not start as one)")
    return problems


def _model_header(path: Path) -> bool:
    """Whether ``path`` starts as a serialized ONNX model (ir_version first, see ONNX_TAG) or, named .xml, as XML."""
    with open(path, "rb") as f:
        head = f.read(5)
    if path.suffix == IR_SUFFIX:
        return head == b"<?xml"
    return len(head) >= 2 and head[0] == ONNX_TAG and 0 < head[1] < 0x80


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``folder/manifest.json`` (its keys, version, family and numbers), not the files it names;
    any problem is one ManifestError line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"no artifact folder at {folder} (create one with: sdtrt export MODEL --out {folder})")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: it is not an sdtrt export (run: sdtrt export)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged_export(folder, None, f"corrupt manifest {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise damaged_export(folder, None, f"corrupt manifest {path}: expected a JSON object")
    source = raw.get("source", {}).get("path") if isinstance(raw.get("source"), dict) else None
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        problem = f"{path} has format_version {version!r}, this sdtrt reads version {FORMAT_VERSION}"
        raise damaged_export(folder, source, problem)
    try:
        manifest = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise damaged_export(folder, source, f"corrupt manifest {path}: {detail}") from exc
    if manifest.family not in FAMILIES:
        raise ManifestError(f"{path}: model family {manifest.family!r} is not supported (known: {FAMILIES})")
    unknown = sorted(name for name in manifest.components if not is_known_network(name))
    if unknown:  # each network's batch rule, LoRA and fallback facts come from engine/network_facts.py
        known = ", ".join((*COMPONENTS, f"{CONTROLNET_PREFIX}NAME"))
        raise ManifestError(f"{path}: unknown networks {unknown} (known: {known})")
    if missing := sorted(set(manifest.controlnets) - {n.removeprefix(CONTROLNET_PREFIX) for n in manifest.components}):
        raise manifest.damaged(folder, f"{path}: ControlNets {missing} have no network in the manifest")
    if problem := manifest.size_problem():
        raise manifest.damaged(folder, f"{path}: {problem}")
    return manifest


def load_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``folder/manifest.json`` and take a cheap look at every file it names (file_problems);
    any problem is one ManifestError line naming the file and the command that rebuilds the export."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for component in manifest.components.values():
        for file in component.all_files():
            if problems := file_problems(folder, file):
                raise manifest.damaged(folder, problems[0])
    return manifest
