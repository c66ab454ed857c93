"""Writing networks into an existing export: what attaching a ControlNet, a tiny VAE or the step-cache graphs share.

Each attaches the same way: its networks are exported into a scratch folder beside the export, moved in only once
all of them are written, and the manifest is saved last, so a failure leaves the export as it was.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from sdtrt.engine.errors import ExportError, SdtrtError
from sdtrt.engine.fsutil import LOCK_NAME
from sdtrt.engine.manifest import Component, ComponentFile, Manifest
from sdtrt.export import exporter, single_file
from sdtrt.export.pickles import safetensors_only
from sdtrt.export.wrappers import NetworkSpec

log = logging.getLogger(__name__)


def export_network(
    module: torch.nn.Module,
    spec: NetworkSpec,
    staging: Path,
    precisions: Sequence[str],
    opset: int,
    *,
    fused: bool = False,
    upcast: bool = False,
) -> Component:
    """One network's ONNX files in ``staging``, as the base export writes them (exporter._export_network); with
    ``fused``, ONNX Runtime's fused graphs too, as the base's UNet has them (``upcast``: its upcast_attention)."""
    fused_files: dict[str, ComponentFile] = {}
    fuse = functools.partial(exporter._export_fused, into=fused_files, upcast_attention=upcast) if fused else None
    try:
        files = exporter._export_network(module.eval(), spec, staging, precisions, opset, fuse)
    except (SdtrtError, ModuleNotFoundError):
        raise
    except Exception as exc:  # torch, diffusers, onnx: a long message and a deep traceback (see --debug)
        raise ExportError(f"exporting {spec.name} failed: {exporter._one_line(exc)}") from exc
    log.info("exported %s (%s)", spec.name, ", ".join([*files, *(f"{p} ORT-fused" for p in fused_files)]))
    return Component(files=files, ort_fused=fused_files)


def move_in(staging: Path, folder: Path, what: str) -> None:
    """Move the files written in ``staging`` into ``folder``; on failure, take back the ones moved."""
    moved: list[Path] = []
    try:
        for file in sorted(staging.iterdir()):
            if file.name == LOCK_NAME:  # the scratch folder's own
                continue
            target = folder / file.name
            if target.exists():  # attached again under its name (overwrite)
                target.unlink()
            shutil.move(file, target)
            moved.append(target)
    except OSError as exc:
        for target in moved:
            target.unlink(missing_ok=True)
        raise ExportError(f"cannot write {what} files into {folder}: {exc}") from exc


@contextmanager
def base_model(
    manifest: Manifest, folder: Path, base: str | os.PathLike[str] | None, allow_pickle: bool = False
) -> Iterator[Path]:
    """The diffusers folder of the model ``folder`` was exported from: ``base`` or the manifest's source (a pickled
    checkpoint only with ``allow_pickle``)."""
    source = base if base is not None else manifest.source.get("path")
    if not source:
        raise ExportError(f"{folder} does not say which model it was exported from: pass the base model (--base)")
    expected = manifest.source.get("sha256")
    if Path(source).is_file():
        resolved = single_file.converted_checkpoint(source, folder, allow_pickle=allow_pickle)
    else:
        model = exporter.resolve_model_folder(source)
        resolved = nothing_to_convert(model, {"sha256": exporter.source_hash(model)})
    with resolved as (model, record):
        if expected and record.get("sha256") != expected:
            raise ExportError(
                f"{source} is not the model {folder} was exported from (its content differs): the UNet an attached "
                "network is made from must be the export's own; pass that model with --base"
            )
        yield model


@contextmanager
def nothing_to_convert(model: Path, record: dict[str, str]) -> Iterator[tuple[Path, dict[str, str]]]:
    yield model, record


def load_base_unet(source: Path, allow_pickle: bool = False) -> torch.nn.Module:
    """The base model's UNet (its weights as safetensors, unless ``allow_pickle``)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(source / "unet", **safetensors_only(source / "unet", allow_pickle))
