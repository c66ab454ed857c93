"""Attach a diffusers ControlNet to an existing export: its own ONNX network, and (the first time) the UNet that
takes the ControlNets' residuals as inputs.

``attach_controlnet(folder, controlnet)`` writes ``controlnet.<name>.onnx`` (at the precisions the export's UNet
has) and names it in the manifest. A ControlNet adds its down and mid residuals to the UNet's skip connections,
so the UNet must take them as inputs: ``unet_controlnet.onnx`` is that UNet, exported from the base model beside
the plain one when the first ControlNet is attached (the base model is the one the manifest names, its content
hash checked, or ``base``). Every later ControlNet of the same base reuses it. An export without ControlNets
has neither file and pays nothing; requests without a control image keep running the plain UNet.

The ControlNet is exported at conditioning scale 1 and without guess mode: the runtime scales its residuals
(per network, per step, guess mode's logarithmic ramp) in NumPy, as diffusers' ControlNetModel does in torch.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdtrt.engine.errors import ExportError
from sdtrt.engine.fsutil import scratch_dir
from sdtrt.engine.manifest import ComponentFile, Manifest, file_records, load_manifest
from sdtrt.engine.network_facts import CONTROLNET_PREFIX
from sdtrt.engine.session import TensorSpec
from sdtrt.export.attach import base_model, export_network, load_base_unet, move_in
from sdtrt.export.chatter import held_back
from sdtrt.export.controlnet_source import load_controlnet
from sdtrt.export.onnx_export import DEFAULT_OPSET
from sdtrt.export.wrappers import NetworkSpec, UNetNet

log = logging.getLogger(__name__)

UNET_CONTROLNET = "unet_controlnet"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # file names and the CLI's NAME=IMAGE need no quoting
KEEP_FP32 = ("timestep", "time_ids")  # as the UNet's: fractional timesteps and pixel sizes


@dataclass(frozen=True)
class Residual:
    """One residual a ControlNet hands the UNet: its channels and how much smaller than the latents it is."""

    name: str  # "down_residual_<i>" | "mid_residual"
    channels: int
    scale: int  # 1, 2, 4, ...: the latent side divided by this

    def spec(self, pooled: bool = False) -> TensorSpec:
        """(batch, channels, h, w); a ControlNet with global_pool_conditions gives (batch, channels, 1, 1)."""
        if pooled:
            return TensorSpec(self.name, "float32", ("batch", self.channels, 1, 1))
        return TensorSpec(self.name, "float32", ("batch", self.channels, *scaled_dims(self.scale)))


def scaled_dims(scale: int) -> tuple[str, str]:
    """The names of a residual's dynamic sides: "latent_height", or "latent_height_4" for a quarter of it."""
    return ("latent_height", "latent_width") if scale == 1 else (f"latent_height_{scale}", f"latent_width_{scale}")


def residual_layout(config: Mapping[str, Any]) -> tuple[Residual, ...]:
    """The residuals of a UNet (or ControlNet) config: one after conv_in, one per resnet of each down block and one
    per down-sampler (every block but the last), then the mid block's."""
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    shapes, scale = [(channels[0], 1)], 1
    for index, (width, count) in enumerate(zip(channels, layers, strict=True)):
        shapes += [(width, scale)] * count
        if index < len(channels) - 1:
            scale *= 2
            shapes.append((width, scale))
    down = tuple(Residual(f"down_residual_{i}", width, s) for i, (width, s) in enumerate(shapes))
    return (*down, Residual("mid_residual", channels[-1], scale))


def trace_dims(manifest: Manifest, layout: Sequence[Residual]) -> dict[str, int]:
    """Example sizes of every dynamic dimension at the model's native size, batch 2 (one CFG pair)."""
    f = manifest.vae_scale_factor
    height, width = manifest.default_height // f, manifest.default_width // f
    dims = {"batch": 2, "height": height * f, "width": width * f}
    for residual in layout:
        h, w = scaled_dims(residual.scale)
        dims[h], dims[w] = height // residual.scale, width // residual.scale
    return dims


def _as_fp32(spec: TensorSpec) -> TensorSpec:
    return replace(spec, dtype="float32") if spec.dtype == "float16" else spec


def _base_unet_file(manifest: Manifest) -> ComponentFile:
    files = manifest.components["unet"].files
    return files.get("fp32") or next(iter(files.values()))


def unet_controlnet_spec(manifest: Manifest, layout: Sequence[Residual]) -> NetworkSpec:
    """The UNet's inputs and output as exported, plus the residuals (last, in order)."""
    unet = _base_unet_file(manifest)
    return NetworkSpec(
        name=UNET_CONTROLNET,
        inputs=(*map(_as_fp32, unet.inputs), *(r.spec() for r in layout)),
        outputs=tuple(map(_as_fp32, unet.outputs)),
        trace_dims=trace_dims(manifest, layout),
        keep_fp32=KEEP_FP32,
    )


def controlnet_spec(
    manifest: Manifest, name: str, conditioning_channels: int, layout: Sequence[Residual], pooled: bool
) -> NetworkSpec:
    """The ControlNet: latents, timestep, text (+ SDXL's pooled text and time ids) and the control image in
    [0, 1] at the image size -> the residuals at conditioning scale 1."""
    unet_inputs = {spec.name: _as_fp32(spec) for spec in _base_unet_file(manifest).inputs}
    latent = ("batch", manifest.latent_channels, "latent_height", "latent_width")
    inputs = [
        TensorSpec("sample", "float32", latent),
        unet_inputs["timestep"],
        unet_inputs["encoder_hidden_states"],
        TensorSpec("controlnet_cond", "float32", ("batch", conditioning_channels, "height", "width")),
        *(unet_inputs[k] for k in ("text_embeds", "time_ids") if k in unet_inputs),
    ]
    return NetworkSpec(
        name=CONTROLNET_PREFIX + name,
        inputs=tuple(inputs),
        outputs=tuple(r.spec(pooled) for r in layout),
        trace_dims=trace_dims(manifest, layout),
        keep_fp32=KEEP_FP32,
    )


class ControlNetNet(torch.nn.Module):
    """A diffusers ControlNetModel at conditioning scale 1: its down residuals, then its mid residual."""

    def __init__(self, controlnet: torch.nn.Module, extra_inputs: tuple[str, ...]) -> None:
        super().__init__()
        self.controlnet = controlnet
        self.extra_inputs = extra_inputs  # SDXL: text_embeds, time_ids

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        *extra: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        added = dict(zip(self.extra_inputs, extra, strict=True))
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=1.0,
            added_cond_kwargs=added or None,
            return_dict=False,
        )
        return (*down, mid)


# --------------------------------------------------------------------------------------------------
# Attaching


def attach_controlnet(
    folder: str | os.PathLike[str],
    controlnet: str | os.PathLike[str],
    *,
    name: str | None = None,
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    opset: int = DEFAULT_OPSET,
    allow_pickle: bool = False,
) -> Manifest:
    """Export ``controlnet`` (a diffusers ControlNet folder, a hub id, or a single .safetensors file diffusers
    converts) into the export ``folder`` as ``controlnet.<name>``, at the precisions of its UNet.

    The first ControlNet also exports ``unet_controlnet`` from the base model: ``base``, or by default the model
    the manifest names (its content hash must match). ``name`` defaults to the ControlNet's folder or file name;
    an attached name is replaced only with ``overwrite``. Nothing in ``folder`` changes unless all of it works.
    Pickled weights are read only with ``allow_pickle``; the libraries' chatter shows only if it all works.
    """
    with held_back():
        return _attach(Path(folder), controlnet, name, base, overwrite, opset, allow_pickle)


def _attach(
    folder: Path,
    controlnet: str | os.PathLike[str],
    name: str | None,
    base: str | os.PathLike[str] | None,
    overwrite: bool,
    opset: int,
    allow_pickle: bool,
) -> Manifest:
    manifest = load_manifest(folder)
    if manifest.family not in ("sd1", "sd2", "sdxl"):
        raise ExportError(f"ControlNets attach to SD 1.x, 2.x and XL exports; {folder} holds a {manifest.family} model")
    unet_inputs = {spec.name for spec in _base_unet_file(manifest).inputs}
    if "timestep_cond" in unet_inputs:
        raise ExportError(f"{folder} holds an LCM-distilled UNet, which ControlNets are not exported for")
    name = _name(controlnet) if name is None else name
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ExportError(f"a ControlNet's name is letters, digits, '_' and '-' (at most 64), got {name!r}")
    if name in manifest.controlnets and not overwrite:
        raise ExportError(f"{folder} has a ControlNet named {name!r} already: pass another name, or --overwrite")
    model, record = load_controlnet(controlnet, allow_pickle)
    config = dict(model.config)
    layout = residual_layout(config)
    check_fits(manifest, config, layout, what=str(controlnet), folder=folder)
    precisions = tuple(sorted(manifest.components["unet"].files))
    ort_fused = bool(manifest.components["unet"].ort_fused)  # as the base: export --ort-fused
    pooled = bool(config.get("global_pool_conditions", False))
    spec = controlnet_spec(manifest, name, int(config.get("conditioning_channels", 3)), layout, pooled)
    with scratch_dir(folder, ".controlnet") as staging:
        components = dict(manifest.components)
        if UNET_CONTROLNET not in components:
            with base_model(manifest, folder, base, allow_pickle) as source:
                unet = load_base_unet(source, allow_pickle)
                base_layout = residual_layout(dict(unet.config))
                if base_layout != layout:
                    raise ExportError(_misfit(str(controlnet), folder, "residuals", layout, base_layout))
                unet_spec = unet_controlnet_spec(manifest, layout)
                extra = tuple(s.name for s in unet_spec.inputs[3:])
                upcast = bool(unet.config.get("upcast_attention"))
                components[UNET_CONTROLNET] = export_network(
                    UNetNet(unet, extra), unet_spec, staging, precisions, opset, fused=ort_fused, upcast=upcast
                )
        extra = tuple(s.name for s in spec.inputs[4:])
        upcast = bool(config.get("upcast_attention"))
        components[spec.name] = export_network(
            ControlNetNet(model, extra), spec, staging, precisions, opset, fused=ort_fused, upcast=upcast
        )
        facts = {"source": record, "global_pool_conditions": pooled}
        updated = replace(manifest, components=components, controlnets={**manifest.controlnets, name: facts})
        written = file_records(staging, updated.read_files())  # the new networks' weight maps
        updated = replace(updated, checksums={**manifest.checksums, **written})
        move_in(staging, folder, "the ControlNet's")
        updated.save(folder)
    log.info("attached ControlNet %s to %s", name, folder)
    return updated


def check_fits(
    manifest: Manifest, config: Mapping[str, Any], layout: Sequence[Residual], what: str, folder: Path
) -> None:
    """One ExportError when a ControlNet config cannot drive this export's UNet (a ControlNet for another base)."""
    unet = {spec.name: spec for spec in _base_unet_file(manifest).inputs}
    width = unet["encoder_hidden_states"].shape[-1]
    if config.get("cross_attention_dim") != width:
        raise ExportError(_misfit(what, folder, "cross-attention width", config.get("cross_attention_dim"), width))
    if config.get("in_channels") != manifest.latent_channels:
        raise ExportError(_misfit(what, folder, "latent channels", config.get("in_channels"), manifest.latent_channels))
    sdxl = config.get("addition_embed_type") == "text_time"
    if sdxl != ("text_embeds" in unet):
        mine, theirs = ("SDXL", "SD 1.x/2.x") if sdxl else ("SD 1.x/2.x", "SDXL")
        raise ExportError(f"{what} is a ControlNet for {mine} models; {folder} holds an {theirs} model")
    downscale = 2 ** (len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
    if downscale != manifest.vae_scale_factor:
        raise ExportError(_misfit(what, folder, "control-image down-scaling", downscale, manifest.vae_scale_factor))
    if UNET_CONTROLNET in manifest.components:  # attached before: the residuals it takes
        taken = residual_inputs(next(iter(manifest.components[UNET_CONTROLNET].files.values())).inputs)
        if [s.shape[1:] for s in taken] != [r.spec().shape[1:] for r in layout]:
            raise ExportError(_misfit(what, folder, "residuals", layout, tuple(s.shape[1] for s in taken)))


def residual_inputs(inputs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The residual inputs of the UNet that takes them, in order."""
    return [spec for spec in inputs if spec.name.startswith("down_residual_") or spec.name == "mid_residual"]


def _misfit(what: str, folder: Path, fact: str, theirs: object, ours: object) -> str:
    """The one line for a ControlNet that does not fit; residual layouts are shown as their channels."""
    theirs, ours = ([getattr(r, "channels", r) for r in x] if isinstance(x, tuple) else x for x in (theirs, ours))
    return (
        f"{what} does not fit the base model of {folder}: its {fact} is {theirs}, the base UNet's {ours} "
        "(a ControlNet for another base model?)"
    )


def _name(source: str | os.PathLike[str]) -> str:
    """A ControlNet's default name: its folder's or file's name, or a hub id's last part, in NAME's letters."""
    stem = Path(source).stem if Path(source).is_file() else Path(str(source).rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-_")[:64] or "controlnet"
