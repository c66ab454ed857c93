"""The models a benchmark runs: a preset or a user's diffusers folder, and its sdtrt exports, cached.

Layout under the benchmark root (default artifacts/bench):

    <key>/model/                 the preset's diffusers folder (a user's folder stays where it is)
    <key>/onnx-<precision>/      the sdtrt export (text encoder, UNet, VAE decoder)
    <key>/onnx-<precision>.json  what it was exported from and how long the export took
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from benchmarks.presets import PRESETS, config_digest, ensure_preset
from sdtrt.engine.errors import ManifestError
from sdtrt.engine.fsutil import write_json_atomic
from sdtrt.engine.manifest import load_manifest
from sdtrt.engine.network_facts import TEXT_ENCODERS

log = logging.getLogger(__name__)


def model_key(model: str) -> str:
    """The folder name under the benchmark root: the preset's name, or the folder's name + a path hash."""
    if model in PRESETS:
        return model
    path = Path(model).resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def ensure_model(model: str, root: str | os.PathLike[str], seed: int = 0) -> tuple[Path, float | None]:
    """The diffusers folder to benchmark and its build seconds (None: cached or a user's folder)."""
    if model in PRESETS:
        return ensure_preset(model, Path(root), seed)
    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder (no model_index.json)")
    return folder, None


def txt2img_components(model_dir: Path) -> list[str]:
    """The networks txt2img loads: the model's text encoders, the UNet and the VAE decoder."""
    index = json.loads((model_dir / "model_index.json").read_text())
    encoders = [name for name in TEXT_ENCODERS if index.get(name) and index[name][0] is not None]
    return [*encoders, "unet", "vae_decoder"]


def _fingerprint(model: str, model_dir: Path, seed: int) -> str:
    """What makes an export stale: the export code, and the preset's configs and seed or the folder's content."""
    import sdtrt.export
    from sdtrt.export.exporter import source_hash

    code = hashlib.sha256()
    for path in sorted(Path(sdtrt.export.__file__).parent.glob("*.py")):
        code.update(path.read_bytes())
    source = config_digest(model, seed) if model in PRESETS else source_hash(model_dir)
    return f"{code.hexdigest()[:16]}-{source}"


def ensure_export(
    model: str,
    model_dir: Path,
    root: str | os.PathLike[str],
    precision: str,
    seed: int = 0,
    given: str | os.PathLike[str] | None = None,
) -> tuple[Path, float | None, bool]:
    """The sdtrt export of ``model_dir`` at ``precision``: (folder, export seconds, whether it was cached).

    ``given`` is an export made elsewhere (its time unknown). Raises the exporter's ExportError for a
    model family the export stage does not support, a ManifestError for a ``given`` without ``precision``.
    """
    if given is not None:
        load_manifest(given).component_file("unet", precision)
        return Path(given), None, True
    from sdtrt.export.exporter import export_model

    out = Path(root) / model_key(model) / f"onnx-{precision}"
    record_path = out.with_name(out.name + ".json")
    fingerprint = _fingerprint(model, model_dir, seed)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("fingerprint") == fingerprint:
        try:
            load_manifest(out)  # an export of an older manifest schema is stale too
            return out, float(record["export_s"]), True
        except ManifestError as exc:
            log.info("re-exporting: %s", exc)
    log.info("exporting %s (%s) to %s", model_dir, precision, out)
    start = time.perf_counter()
    components = txt2img_components(model_dir)
    # with ONNX Runtime's fused graphs: ort-cuda runs the fp16 ones, ort-cpu the fp32 UNet (engine/backends.py)
    export_model(model_dir, out, precisions=(precision,), components=components, overwrite=True, ort_fused=True)
    seconds = time.perf_counter() - start
    write_json_atomic(record_path, {"source": str(model_dir), "fingerprint": fingerprint, "export_s": seconds})
    return out, seconds, False


def ensure_int8(export: Path, height: int | None, width: int | None) -> float | None:
    """Quantize ``export`` to int8 (`sdtrt quantize`) unless it is already (with ort-cpu's UNet too: one quantized
    before that is quantized again): the seconds it took, None if it was. Calibrated on four of the built-in
    prompts, 10 steps each, at ``height`` x ``width`` (default: native)."""
    from sdtrt.quantize import DEFAULT_PROMPTS, quantize

    if any(component.onnxruntime for component in load_manifest(export).components.values()):
        return None
    log.info("quantizing %s to int8", export)
    start = time.perf_counter()
    quantize(export, prompts=DEFAULT_PROMPTS[:4], steps=10, height=height, width=width, overwrite=True)
    return time.perf_counter() - start


def ensure_latency_graphs(export: Path, root: str | os.PathLike[str], step_cache: bool, tiny_vae: bool) -> None:
    """Attach what per-image rows need to ``export``, once: the step-cache graphs (DeepCache's default branch) and
    a random-weight tiny VAE of TAESD's own config (it costs what TAESD costs), built under ``root``."""
    manifest = load_manifest(export)
    if step_cache and manifest.step_cache is None:
        from sdtrt.export.step_cache import attach_step_cache

        log.info("attaching the step-cache graphs to %s", export)
        attach_step_cache(export)
    if tiny_vae and manifest.tiny_vae is None:
        from sdtrt.export.tiny import build_tiny_taesd
        from sdtrt.export.tiny_vae import attach_tiny_vae

        taesd = Path(root) / "taesd"
        if not (taesd / "config.json").is_file():
            build_tiny_taesd(taesd, taesd_size=True, overwrite=True)
        log.info("attaching a TAESD-sized tiny VAE to %s", export)
        attach_tiny_vae(export, taesd)
