"""int8 OpenVINO IRs of an export's networks (`sdtrt quantize DIR --int8`), written into the export.

Hybrid post-training quantization, as OpenVINO's Stable Diffusion notebooks and optimum-intel do it (int8
of every activation is known to hurt SD images): NNCF first stores the weights of every MatMul (attention
and feed-forward projections) as int8, weights only, then quantizes the rest of the UNet (convolutions:
weights and inputs; the attention products) with activation ranges measured on calibration inputs, the
UNet's inputs recorded while the runtime drew a set of prompts (sdtrt/quantize.py records them). The text
encoders and the UNet that takes ControlNet residuals get weight compression only (no calibration); the VAE
and the ControlNets stay as they are (the VAE's convolutions run once per image, on the picture's pixels).

The calibrated UNet gets ONNX Runtime's static QDQ graph for ort-cpu too, from the same inputs
(export/ort_quantize.py), beside its IR as ``unet.int8-<digest>.onnx`` + ``.onnx.data`` (Component.onnxruntime).

Each IR (``unet.int8-<digest>.xml`` + ``.bin`` beside ``unet.onnx``) is written in a scratch folder, renamed into the
export under a name of its own, and only then recorded in the manifest (Component.openvino["int8"]), which
is replaced atomically: an interrupted run leaves the export as it was (files a killed run renamed in but
never recorded are removed by the next run), and `sdtrt verify` checks the IRs as it checks the ONNX files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.engine.fsutil import data_file_name, onnx_digest, onnx_files, scratch_dir
from sdtrt.engine.manifest import ComponentFile, Manifest, load_manifest
from sdtrt.export.ort_quantize import QUANTIZED, calibrate, quantize_static_qdq, rename_onnx

log = logging.getLogger(__name__)

HYBRID, WEIGHTS = "hybrid", "weights"  # int8 weights and activations where safe / int8 weights only
# the networks quantized, and how; the UNet that takes ControlNet residuals gets int8 weights only (calibrating its
# activations would need control images)
MODES = {"unet": HYBRID, "unet_controlnet": WEIGHTS, "text_encoder": WEIGHTS, "text_encoder_2": WEIGHTS}
# the UNet's first and last convolutions keep their float activations: the demo model's gate (tests/test_quantize.py,
# 200 captions) lost 10.5 points of kind with them quantized, 4.5 without (bf16 88 %); together a sliver of the work
FIRST_AND_LAST = (r".*/conv_in/.*", r".*/conv_out/.*")
IR_INFIX = ".int8-"  # beside unet.onnx: unet.int8-<the first 12 hex of the IR's sha256>.xml and .bin
MAX_SAMPLES = 300  # NNCF's own default subset size


@dataclass(frozen=True)
class QuantizationPlan:
    """What a quantize run will do to an export: checked before any calibration runs."""

    folder: Path
    manifest: Manifest
    networks: dict[str, str]  # network -> HYBRID | WEIGHTS

    @property
    def calibrated(self) -> list[str]:
        """The networks that need calibration inputs."""
        return [network for network, mode in self.networks.items() if mode == HYBRID]


def plan_quantization(folder: str | os.PathLike[str], overwrite: bool = False) -> QuantizationPlan:
    """Check that the export in ``folder`` can be quantized: its manifest, and every byte of the fp32 networks
    to quantize against the sha256 it records. One clear error (ManifestError naming the command that rebuilds
    the export, InvalidInputError for an export quantized already without ``overwrite``)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    networks = {name: mode for name, mode in MODES.items() if name in manifest.components}
    if "unet" not in networks:
        raise InvalidInputError(f"{folder} has no UNet to quantize (it has {sorted(manifest.components)})")
    for network in networks:
        try:
            file = manifest.component_file(network, "fp32")
        except ManifestError as exc:  # an fp16-only export
            raise InvalidInputError(f"{folder}: quantizing starts from the fp32 export: {exc}") from None
        if onnx_digest(folder / file.path) != file.sha256:
            raise manifest.damaged(folder, f"{folder / file.path} changed since the export (its sha256 differs)")
        component = manifest.components[network]
        if ("int8" in component.openvino or "int8" in component.onnxruntime) and not overwrite:
            raise InvalidInputError(f"{folder} is quantized to int8 already (use --overwrite to quantize it again)")
    return QuantizationPlan(folder, manifest, networks)


def quantize_export(
    plan: QuantizationPlan, samples: Mapping[str, Sequence[Mapping[str, np.ndarray]]], calibration: Mapping[str, Any]
) -> Manifest:
    """Quantize the plan's networks (``samples``: each calibrated network's recorded inputs; ``calibration``:
    how they were recorded, kept in the manifest), write their IRs into the export and record them; the new
    manifest. The export's manifest must still be the plan's (nothing else wrote it meanwhile)."""
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.WARNING)  # else a line per quantizer it places or skips
    folder = plan.folder
    if load_manifest(folder) != plan.manifest:
        raise InvalidInputError(f"{folder}: its manifest changed while calibrating (another command wrote it)")
    for network in plan.calibrated:
        if not samples.get(network):
            raise InvalidInputError(f"no calibration inputs were recorded for {network}")
    remove_unrecorded(folder, plan.manifest)
    files: dict[str, ComponentFile] = {}  # the OpenVINO IRs
    graphs: dict[str, ComponentFile] = {}  # ONNX Runtime's static QDQ graphs (the calibrated networks')
    moved: list[Path] = []
    try:
        with scratch_dir(folder / "manifest.json", ".quantize") as scratch:
            for network, mode in plan.networks.items():
                start = time.perf_counter()
                source = plan.manifest.component_file(network, "fp32")
                model = ov.Core().read_model(str(folder / source.path))
                if mode == HYBRID:
                    model = _hybrid(nncf, model, samples[network][:MAX_SAMPLES])
                else:
                    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
                staged = scratch / network / "model.xml"
                ov.save_model(model, str(staged), compress_to_fp16=True)
                del model
                common = {"samples": min(len(samples.get(network, ())), MAX_SAMPLES)}
                common |= {"calibration": dict(calibration)} if mode == HYBRID else {}
                report = {"mode": mode, "nncf": nncf.__version__, "openvino": ov.__version__.split("-")[0]} | common
                staged = staged.rename(staged.with_name(_int8_name(source, staged, ".xml")))
                os.replace(staged.with_name("model.bin"), staged.with_name(data_file_name(staged.name)))
                files[network] = _move_in(folder, source, staged, report, start, moved)
                if mode == HYBRID:  # ONNX Runtime's too, for ort-cpu
                    start = time.perf_counter()
                    staged = scratch / network / "model.onnx"
                    ranges = scratch / network / "ranges.json"
                    calibrate(folder / source.path, samples[network][:MAX_SAMPLES], QUANTIZED, ranges)
                    quantize_static_qdq(folder / source.path, staged, ranges)
                    staged = rename_onnx(staged, _int8_name(source, staged, ".onnx"))
                    report = {"mode": "static-qdq", "onnxruntime": _onnxruntime_version()} | common
                    graphs[network] = _move_in(folder, source, staged, report, start, moved)
        components = {
            name: replace(
                component,
                openvino={**component.openvino, **({"int8": files[name]} if name in files else {})},
                onnxruntime={**component.onnxruntime, **({"int8": graphs[name]} if name in graphs else {})},
            )
            for name, component in plan.manifest.components.items()
        }
        manifest = replace(plan.manifest, components=components)
        manifest.save(folder)
    except BaseException:  # interrupted or failed: the manifest is the old one; what was renamed in goes
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    remove_unrecorded(folder, manifest)  # the IRs of an earlier quantization (--overwrite)
    return manifest


def _int8_name(source: ComponentFile, staged: Path, suffix: str) -> str:
    """``<the fp32 file's stem>.int8-<the first 12 hex of the staged file's sha256>`` + ``suffix``."""
    return f"{PurePosixPath(source.path).stem}{IR_INFIX}{onnx_digest(staged)[:12]}{suffix}"


def _move_in(
    folder: Path, source: ComponentFile, staged: Path, report: dict, start: float, moved: list[Path]
) -> ComponentFile:
    """Rename ``staged`` (an IR's .xml or a QDQ graph's .onnx, named already) and its weights into the export
    beside ``source``, adding the paths that were not there to ``moved``; its manifest entry."""
    digest = onnx_digest(staged)
    relative = str(PurePosixPath(source.path).with_name(staged.name))
    final = folder / relative
    data = final.with_name(data_file_name(final.name))
    for staged_file, target in ((staged.with_name(data_file_name(staged.name)), data), (staged, final)):
        if not target.exists():  # else the same file, recorded already: the old manifest keeps it
            moved.append(target)
        os.replace(staged_file, target)  # the weights first: a model file names a complete network
    seconds = time.perf_counter() - start
    log.info("%s: int8 (%s) in %.0f s: %s", source.path, report["mode"], seconds, relative)
    return replace(
        source,
        path=relative,
        sha256=digest,
        size=final.stat().st_size,
        data_size=data.stat().st_size,
        weights=None,
        fusion=None,
        quantization={**report, "seconds": round(seconds, 1)},
    )


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _hybrid(nncf, model, samples: Sequence[Mapping[str, np.ndarray]]):
    """int8 weights on the MatMuls with a constant input (weights only), int8 weights and activations on the
    rest where NNCF's transformer rules put quantizers (optimum-intel's hybrid mode), but the first and last
    convolutions, whose weights stay as they are."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    weighted = [op.get_friendly_name() for op in model.get_ops() if _weighted_matmul(op)]
    model = nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=nncf.IgnoredScope(types=["Convolution"])
    )
    return nncf.quantize(
        model,
        nncf.Dataset(list(samples)),
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=nncf.IgnoredScope(names=weighted, patterns=list(FIRST_AND_LAST), validate=False),
        subset_size=len(samples),
        # their weights are int8 already: no smoothing to fold into them
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)
        ),
    )


def _weighted_matmul(op) -> bool:
    """Whether ``op`` is a MatMul one of whose inputs is a constant (possibly behind a Convert): a weight."""
    if op.get_type_name() != "MatMul":
        return False
    for value in op.input_values():
        node = value.get_node()
        if node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        if node.get_type_name() == "Constant":
            return True
    return False


def remove_unrecorded(folder: Path, manifest: Manifest) -> None:
    """Remove the int8 files (IRs, QDQ graphs) in the export's network folders that its manifest does not name
    (a killed run's, or an earlier quantization's)."""
    quantized = [f for c in manifest.components.values() for f in (*c.openvino.values(), *c.onnxruntime.values())]
    named = {p for f in quantized for p in onnx_files(folder / f.path)}
    for component in manifest.components.values():
        for file in component.files.values():
            onnx = folder / file.path
            for path in onnx.parent.glob(f"{onnx.stem}{IR_INFIX}*"):
                if path not in named and path.suffix in (".xml", ".bin", ".onnx", ".data"):
                    log.info("removing %s (no manifest names it)", path)
                    path.unlink(missing_ok=True)
