"""Step caching (DeepCache, Ma et al. 2024): the two graphs a cached denoising loop runs, attached to an export.

DeepCache numbers the UNet's skip branches from the outside in: branch ``b`` is up block ``b // 3`` counted from
the output, layer ``b % 3`` of it counted from its end, and the down-block layers that feed it. On a full step the
whole UNet runs and the feature entering that branch's shallow layers from below (the output of the deep part) is
kept; on the steps between, only the shallow part runs — conv_in, the down layers before the branch, the up layers
from the branch on, conv_out — with the kept feature in place of everything deeper. Two graphs do it:

- ``unet_cache``: the UNet with the feature as a second output ("noise_pred", "feature");
- ``unet_shallow``: the shallow part, the feature as its last input.

Which modules are deep follows DeepCache's own ``DeepCacheSDHelper`` rule (per down/up block and layer, the mid
block always), applied here while tracing: the deep modules are replaced by their recorded outputs, which nothing
the graph returns depends on, so the exporter drops them — except the last one before the shallow up layers,
which returns the feature input. The runtime runs them in DeepCache's schedule (runtime/step_cache.py).

Neither graph stores the UNet's weights again: their initializers that hold the same bytes as one in the UNet's
external-data file point into that file (share_weights), so the export grows by the graphs' structure and any
weights of their own (none for a UNet: every weight is the UNet's). Their weight maps (LoRA's, as the UNet's) point
into that file too; the shallow graph's lists the deep layers' weights as unused.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx.external_data_helper import uses_external_data

from sdtrt.engine.errors import ExportError
from sdtrt.engine.fsutil import scratch_dir
from sdtrt.engine.manifest import Component, Manifest, load_manifest
from sdtrt.engine.session import TensorSpec
from sdtrt.engine.weights import load_weight_map
from sdtrt.export import exporter
from sdtrt.export.attach import base_model, export_network, load_base_unet, move_in
from sdtrt.export.controlnet import KEEP_FP32, scaled_dims
from sdtrt.export.onnx_export import DEFAULT_OPSET, save_onnx
from sdtrt.export.weight_map import map_path, relocate_weight_map
from sdtrt.export.wrappers import NetworkSpec, UNetNet

log = logging.getLogger(__name__)

CACHE, SHALLOW = "unet_cache", "unet_shallow"
FEATURE = "feature"
DEFAULT_BRANCH = 0  # DeepCache's for SD 1.5 and SDXL (its README's examples): the shallowest branch
LAYERS_PER_BRANCH_BLOCK = 3  # DeepCache numbers 3 branches per up block (SD's up blocks have 3 layers)


@dataclass(frozen=True)
class Unit:
    """A module DeepCache may skip: its kind, DeepCache's block and layer numbers, what it holds, in run order."""

    module: torch.nn.Module
    kind: str  # "down" | "mid" | "up"
    block: int  # down blocks from the input, up blocks from the output
    layer: int  # down: from the block's start (a down-sampler after its resnets); up: from the block's end
    children: tuple[Unit, ...] = ()

    def skipped(self, block: int, layer: int) -> bool:
        """Whether a cached step skips this module for the branch at (``block``, ``layer``) (DeepCache's rule)."""
        if self.kind == "mid" or self.block > block:
            return True
        if self.block < block:
            return False
        return self.layer >= layer if self.kind == "down" else self.layer > layer


def units(unet: torch.nn.Module) -> tuple[Unit, ...]:
    """The UNet's down blocks, mid block and up blocks as DeepCache numbers them, each with its layers."""
    found = []
    for index, block in enumerate(unet.down_blocks):
        resnets, attentions = list(block.resnets), list(getattr(block, "attentions", None) or [])
        layers = [Unit(m, "down", index, i) for i, m in enumerate(resnets)]
        layers += [Unit(m, "down", index, i) for i, m in enumerate(attentions)]
        layers += [Unit(m, "down", index, len(resnets)) for m in block.downsamplers or []]
        found.append(Unit(block, "down", index, 0, tuple(layers)))
    found.append(Unit(unet.mid_block, "mid", 0, 0))
    count = len(unet.up_blocks)
    for index, block in enumerate(unet.up_blocks):
        resnets, attentions = list(block.resnets), list(getattr(block, "attentions", None) or [])
        numbered = [(i, m) for i, m in enumerate(resnets)] + [(i, m) for i, m in enumerate(attentions)]
        ordered = sorted(numbered, key=lambda pair: pair[0])  # run order: resnet i, then attention i
        layers = [Unit(m, "up", count - 1 - index, len(resnets) - 1 - i) for i, m in ordered]
        layers += [Unit(m, "up", count - 1 - index, 0) for m in block.upsamplers or []]
        found.append(Unit(block, "up", count - 1 - index, 0, tuple(layers)))
    return tuple(found)


def branch_position(unet: torch.nn.Module, branch: int) -> tuple[int, int]:
    """(block, layer) of DeepCache's ``branch``; one ExportError line for a branch this UNet does not have."""
    last = LAYERS_PER_BRANCH_BLOCK * len(unet.up_blocks) - 1
    if not isinstance(branch, int) or isinstance(branch, bool) or not 0 <= branch <= last:
        raise ExportError(f"cache branch must be an integer from 0 to {last} for this UNet, got {branch!r}")
    return divmod(branch, LAYERS_PER_BRANCH_BLOCK)


def split(unet: torch.nn.Module, branch: int) -> tuple[list[Unit], Unit]:
    """The modules a cached step skips (outermost first), and the one whose output is the cached feature: the
    last skipped module the up path runs before its first shallow layer."""
    block, layer = branch_position(unet, branch)
    skipped: list[Unit] = []
    feature = None
    for unit in units(unet):
        if unit.skipped(block, layer):
            skipped.append(unit)
            feature = unit if unit.kind != "down" else feature
            continue
        for child in unit.children:
            if child.skipped(block, layer):
                skipped.append(child)
                feature = child if unit.kind == "up" else feature
            elif unit.kind == "up":
                return skipped, feature
    raise ExportError(f"cache branch {branch} leaves no shallow up layer in this UNet")  # not for DeepCache's UNets


def _first(output: Any) -> torch.Tensor:
    """The hidden states a module returns (a transformer returns them first in a tuple)."""
    return output[0] if isinstance(output, tuple) else output


class CacheUNetNet(UNetNet):
    """The UNet returning its noise prediction and the cached feature (the feature module's output)."""

    def __init__(self, unet: torch.nn.Module, extra_inputs: tuple[str, ...], feature: Unit) -> None:
        super().__init__(unet, extra_inputs)
        self.feature = feature  # a Unit, not a module: the UNet stays the wrapper's one child (its weight map's)
        self._seen: list[torch.Tensor] = []

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        hook = self.feature.module.register_forward_hook(lambda _m, _a, output: self._seen.append(_first(output)))
        try:
            noise_pred = super().forward(*inputs)
        finally:
            hook.remove()
        return noise_pred, self._seen.pop()


class ShallowUNetNet(UNetNet):
    """The UNet's shallow part: the deep modules return what they returned on a recorded run (dead values the
    exporter drops), and the feature module returns the ``feature`` input (last)."""

    def __init__(
        self, unet: torch.nn.Module, extra_inputs: tuple[str, ...], skipped: list[Unit], feature: Unit
    ) -> None:
        super().__init__(unet, extra_inputs)
        self.skipped, self.feature = skipped, feature
        self.recorded: dict[int, Any] = {}

    def record(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run the whole UNet once on ``inputs`` (without the feature), keeping each skipped module's output;
        returns the feature."""

        def keep(module: torch.nn.Module, _args: Any, output: Any) -> None:
            self.recorded[id(module)] = output

        hooks = [unit.module.register_forward_hook(keep) for unit in self.skipped]
        try:
            with torch.no_grad():
                super().forward(*inputs)
        finally:
            for hook in hooks:
                hook.remove()
        return _first(self.recorded[id(self.feature.module)])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        *unet_inputs, feature = inputs
        replaced: dict[torch.nn.Module, Callable[..., Any]] = {}
        for unit in self.skipped:
            value = self.recorded[id(unit.module)]
            if unit is self.feature:
                value = (feature, *value[1:]) if isinstance(value, tuple) else feature
            replaced[unit.module] = lambda *_a, _value=value, **_k: _value
        with _forwards(replaced):
            return super().forward(*unet_inputs)


@contextmanager
def _forwards(replaced: dict[torch.nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Modules whose forward is replaced for the block (an instance attribute shadowing the class's method)."""
    for module, forward in replaced.items():
        module.forward = forward
    try:
        yield
    finally:
        for module in replaced:
            del module.forward


# --------------------------------------------------------------------------------------------------
# Specs and attaching


def _as_fp32(spec: TensorSpec) -> TensorSpec:
    return replace(spec, dtype="float32") if spec.dtype == "float16" else spec


def step_cache_specs(manifest: Manifest, feature: torch.Tensor) -> tuple[NetworkSpec, NetworkSpec]:
    """The two graphs' specs: the UNet's inputs (as exported), the feature (batch, C, h/s, w/s) beside them."""
    files = manifest.components["unet"].files
    unet = files.get("fp32") or next(iter(files.values()))
    inputs, outputs = tuple(map(_as_fp32, unet.inputs)), tuple(map(_as_fp32, unet.outputs))
    f = manifest.vae_scale_factor
    height, width = manifest.default_height // f, manifest.default_width // f
    scale = height // feature.shape[2]
    dims = {"batch": 2, "latent_height": height, "latent_width": width}
    side_names = scaled_dims(scale)
    dims |= dict(zip(side_names, (height // scale, width // scale), strict=True))
    spec = TensorSpec(FEATURE, "float32", ("batch", feature.shape[1], *side_names))
    cache = NetworkSpec(CACHE, inputs, (*outputs, spec), dims, keep_fp32=KEEP_FP32)
    shallow = NetworkSpec(SHALLOW, (*inputs, spec), outputs, dims, keep_fp32=KEEP_FP32)
    return cache, shallow


def attach_step_cache(
    folder: str | os.PathLike[str],
    *,
    branch: int = DEFAULT_BRANCH,
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    opset: int = DEFAULT_OPSET,
) -> Manifest:
    """Export the step-cache graphs of the UNet of ``folder``'s model (``base``, or the one the manifest names) at
    DeepCache's cache ``branch`` into the export, at its UNet's precisions. Graphs attached before (for any
    branch) are replaced only with ``overwrite``. Nothing in ``folder`` changes unless all of it works."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    if manifest.family not in ("sd1", "sd2", "sdxl"):
        raise ExportError(f"step caching is for SD 1.x, 2.x and XL exports; {folder} holds a {manifest.family} model")
    if manifest.step_cache is not None and not overwrite:
        held = manifest.step_cache["branch"]
        raise ExportError(f"{folder} has step-cache graphs (branch {held}) already: pass --overwrite to replace them")
    with base_model(manifest, folder, base) as source:
        unet = load_base_unet(source).eval()
    skipped, feature_unit = split(unet, branch)
    unet_files = manifest.components["unet"].files
    with scratch_dir(folder, ".step-cache") as staging:
        extra = tuple(s.name for s in next(iter(unet_files.values())).inputs[3:])
        shallow = ShallowUNetNet(unet, extra, skipped, feature_unit)
        probe = step_cache_specs(manifest, torch.zeros(1, 1, 1, 1))[0]  # the trace's inputs, before the feature
        feature = shallow.record(probe.example_inputs(torch.Generator().manual_seed(0)))
        specs = step_cache_specs(manifest, feature)
        modules = (CacheUNetNet(unet, extra, feature_unit), shallow)
        components = dict(manifest.components)
        for module, spec in zip(modules, specs, strict=True):
            written = export_network(module, spec, staging, tuple(sorted(unet_files)), opset)
            files = {}
            for precision, file in written.files.items():
                share_weights(staging / file.path, folder / unet_files[precision].path)
                files[precision] = exporter._component_file(staging / file.path, spec, precision)
            components[spec.name] = Component(files=files)
        updated = replace(manifest, components=components, step_cache={"branch": branch})
        move_in(staging, folder, "the step-cache graphs'")
        updated.save(folder)
    log.info("attached the step-cache graphs (branch %d) to %s", branch, folder)
    return updated


def share_weights(path: Path, base: Path) -> int:
    """Point every initializer of the ONNX file ``path`` that holds the same bytes as an external-data initializer
    of ``base`` at ``base``'s data file (relative: the two files end up in one folder), and write ``path`` again
    with only the rest, and its weight map (LoRA's) pointing where its weights now lie; returns the bytes
    shared."""
    shared = _external_tensors(base)
    model = onnx.load(str(path), load_external_data=True)
    saved = 0
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data"):
            continue
        key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(tensor.raw_data).digest())
        if (entries := shared.get(key)) is not None:
            saved += len(tensor.raw_data)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for name, value in entries:
                tensor.external_data.add(key=name, value=value)
    own_data = path.with_name(path.name + ".data")
    own_data.unlink(missing_ok=True)
    save_onnx(model, path)
    if (weights := map_path(path)).exists():
        relocate_weight_map(load_weight_map(weights), model, path, data_name=base.name + ".data")
    log.info("%s: %.1f MiB of weights read from %s", path.name, saved / 2**20, base.name)
    return saved


def _external_tensors(base: Path) -> dict[tuple[int, tuple[int, ...], bytes], list[tuple[str, str]]]:
    """The external-data initializers of ``base`` by (type, shape, sha256 of their bytes): their external_data."""
    model = onnx.load(str(base), load_external_data=False)
    found: dict[tuple[int, tuple[int, ...], bytes], list[tuple[str, str]]] = {}
    maps: dict[str, mmap.mmap] = {}
    try:
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor):
                continue
            info = {entry.key: entry.value for entry in tensor.external_data}
            location = info["location"]
            if location not in maps:
                with open(base.with_name(location), "rb") as f:
                    maps[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            offset, length = int(info.get("offset", 0)), int(info["length"])
            digest = hashlib.sha256(maps[location][offset : offset + length]).digest()
            found[(tensor.data_type, tuple(tensor.dims), digest)] = list(info.items())
    finally:
        for mapped in maps.values():
            mapped.close()
    return found
