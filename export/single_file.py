"""Single-file checkpoints (.safetensors; legacy pickles on request) -> a temporary diffusers folder.

A single-file checkpoint holds every network in the original key layout (LDM for SD 1.x / 2.x, SGM for
SDXL). diffusers' ``from_single_file`` converts it given the diffusers configs of its architecture; sdtrt
ships those configs (assets/configs/<name>/, JSON only, from the reference hub models) so nothing is
fetched from the network, and writes the tokenizers' vocabulary from the bundled CLIP BPE file. The
converted folder then takes the ordinary export path and is removed afterwards, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdtrt.engine.errors import ExportError
from sdtrt.engine.fsutil import scratch_dir, sha256_file, write_json_atomic
from sdtrt.export.clip_vocab import EOS, write_clip_tokenizer
from sdtrt.export.pickles import PICKLE_SUFFIXES, pickle_refusal

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "assets" / "configs"
# diffusers' infer_diffusers_model_type -> the bundled config folder; SD 2.x ("v2") goes by prediction type
BUNDLED = {
    "v1": "sd15",
    "inpainting": "sd15-inpainting",
    "inpainting_v2": "sd2-inpainting",
    "xl_base": "sdxl-base",
    "xl_inpaint": "sdxl-inpainting",
    "xl_refiner": "sdxl-refiner",
}
SD2_CONFIGS = {"v_prediction": "sd21", "epsilon": "sd21-base"}  # 768 v-prediction, 512 epsilon
CONFIG_ONLY = {"upscale"}  # supported by the exporter, but no bundled configs: the user gives --config
PREDICTION_TYPES = ("epsilon", "v_prediction")
UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # the UNet's first convolution
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# ModelSpec metadata ("modelspec.prediction_type") as various trainers write it
PREDICTION_HINTS = {
    "v": "v_prediction",
    "v_prediction": "v_prediction",
    "velocity": "v_prediction",
    "epsilon": "epsilon",
}


@contextlib.contextmanager
def converted_checkpoint(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
) -> Iterator[tuple[Path, dict[str, str]]]:
    """Yield (a diffusers folder converted from ``checkpoint``, the manifest's source record).

    The folder lives in a temporary folder beside ``out_dir`` (it can take gigabytes) and is removed on
    exit. ``config`` is a diffusers folder whose configs to use instead of the bundled ones (other
    architectures, fine-tunes of other shapes); ``prediction_type`` overrides what the checkpoint says
    or what is assumed. Pickled checkpoints are read only with ``allow_pickle``: unpickling can run code
    hidden in the file, and torch's weights-only unpickler (used here) narrows that risk but is no sandbox.
    """
    path = Path(checkpoint)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ExportError(f"unknown prediction type {prediction_type!r} (known: {', '.join(PREDICTION_TYPES)})")
    file_format = _file_format(path)
    if file_format == "pickle" and not allow_pickle:
        raise pickle_refusal(path)
    with scratch_dir(out_dir, ".convert") as work:  # a killed run's folder is removed by the next one
        weights = path if file_format == "safetensors" else _unpickle(path, work / "checkpoint.safetensors")
        shapes, metadata = _read_header(weights)
        model_type = _model_type(path, shapes, config is not None)
        config_dir, config_name, prediction_source = _prepare_configs(
            work / "configs", model_type, shapes, metadata, config, prediction_type
        )
        folder = _convert(path, weights, config_dir, config_name, work / "model")
        log.info("hashing %s", path)
        source = {
            "path": str(path),
            "sha256": sha256_file(path),
            "checkpoint_type": model_type,  # diffusers' name for the architecture
            "configs": config_name,
            "prediction_type_from": prediction_source,
        }
        yield folder, source


def _file_format(path: Path) -> str:
    """The file's format, "safetensors" or "pickle", from its first bytes (failing those, its suffix)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror}") from None
    if len(head) == 9 and head[8:9] == b"{":  # a little-endian u64 header length, then the JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip archive, or a bare pickle
        return "pickle"
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"  # a damaged one: the reader says what is wrong
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise ExportError(
        f"{path} is neither a diffusers folder nor a checkpoint (.safetensors; .ckpt/.pt/.pth/.bin with --allow-pickle)"
    )


def _unpickle(path: Path, out: Path) -> Path:
    """Read a pickled checkpoint with torch's weights-only unpickler and store its tensors as ``out`` (safetensors)."""
    import torch
    from safetensors.torch import save_file

    if tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
        # CVE-2025-32434: before torch 2.6 a crafted file could run code even with weights_only=True
        raise ExportError(f"reading pickled checkpoints needs torch >= 2.6 (this is {torch.__version__})")
    log.warning("reading pickled checkpoint %s with torch's weights-only unpickler (--allow-pickle)", path)
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # pickle.UnpicklingError, RuntimeError, EOFError, ...: all mean "cannot read it"
        lines = str(exc).splitlines() or [type(exc).__name__]
        reason = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0])
        reason = reason.split(" Please use")[0]  # torch goes on to suggest allow-listing the class
        raise ExportError(f"cannot read {path} with torch's weights-only unpickler: {reason}") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning checkpoints
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise ExportError(f"{path} holds no state dict of tensors")
    save_file(_unshared(tensors), out)
    return out


def _unshared(tensors: dict[str, Any]) -> dict[str, Any]:
    """The tensors, each contiguous and owning its storage (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        if (storage in seen and tensor.numel()) or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        seen.add(storage)
        out[key] = tensor
    return out


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor's shape and the file's metadata, from the safetensors header alone (no weights read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (not a dict)
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{path} is not a readable .safetensors file: {exc}") from None
    return shapes, metadata


def _model_type(path: Path, shapes: dict[str, tuple[int, ...]], has_config: bool) -> str:
    """diffusers' name for the checkpoint's architecture; an error for what sdtrt cannot export."""
    import torch
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    if UNET_KEY not in shapes:
        raise ExportError(f"{path} is not a Stable Diffusion checkpoint: it has no UNet weights ({UNET_KEY})")
    # diffusers reads key names and shapes only: meta tensors stand in for the weights
    model_type = infer_diffusers_model_type({key: torch.empty(shape, device="meta") for key, shape in shapes.items()})
    if model_type not in BUNDLED and model_type not in CONFIG_ONLY and model_type != "v2":
        raise ExportError(
            f"{path} holds a model of type {model_type}, which sdtrt does not export "
            "(supported: Stable Diffusion 1.x, 2.x, XL base, refiner and inpainting)"
        )
    if has_config:
        return model_type
    if model_type in CONFIG_ONLY:
        raise ExportError(f"sdtrt has no bundled configs for {model_type} checkpoints: pass --config DIR")
    if model_type == "v1" and CHECKPOINT_KEY_NAMES["v1"] not in shapes:  # diffusers' fallback guess
        raise ExportError(
            f"{path}: unknown architecture (a UNet that is none of SD 1.x, 2.x, XL): pass --config DIR, "
            "a diffusers folder with the configs of its architecture"
        )
    return model_type


def _prepare_configs(
    out: Path,
    model_type: str,
    shapes: dict[str, tuple[int, ...]],
    metadata: dict[str, str],
    config: str | os.PathLike[str] | None,
    prediction_type: str | None,
) -> tuple[Path, str, str]:
    """Write the configs from_single_file reads to ``out``: (that folder, their name, where the prediction type
    came from). The scheduler's prediction type is set from the request, else the checkpoint's markers, else
    kept (an SD 2.x checkpoint without either is assumed to be a 768 v-prediction model)."""
    found, reason = (prediction_type, "given") if prediction_type else _prediction_hint(shapes, metadata)
    if config is not None:
        source, name = Path(config), str(config)
        if not (source / "model_index.json").is_file():
            raise ExportError(f"--config {source} is not a diffusers folder (no model_index.json)")
    else:
        if model_type == "v2" and found is None:
            found, reason = "v_prediction", "assumed"
            log.warning(
                "SD 2.x checkpoint with no prediction type in it: assuming a 768x768 v-prediction model "
                "(SD 2.x 512-base models predict epsilon: pass --prediction-type epsilon for those)"
            )
        name = SD2_CONFIGS[found] if model_type == "v2" else BUNDLED[model_type]
        source = CONFIGS / name
    _copy_configs(source, out)
    scheduler_path = out / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_path.read_text(encoding="utf-8"))
    if found is None:
        found, reason = scheduler.get("prediction_type", "epsilon"), "the configs"
    scheduler["prediction_type"] = found
    if "ztsnr" in shapes:  # a marker some zero-terminal-SNR fine-tunes carry: their schedule ends at pure noise
        scheduler |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        log.info("the checkpoint is marked zero-terminal-SNR: rescaled betas, trailing timesteps")
    write_json_atomic(scheduler_path, scheduler)
    log.info("checkpoint type %s; configs %s; prediction type %s (%s)", model_type, name, found, reason)
    return out, name, reason


def _prediction_hint(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> tuple[str | None, str]:
    """What the checkpoint itself says about its prediction type: (type or None, where it says so)."""
    if "v_pred" in shapes:  # an empty tensor v-prediction fine-tunes carry as a marker
        return "v_prediction", "the checkpoint's v_pred marker"
    hint = PREDICTION_HINTS.get(metadata.get("modelspec.prediction_type", "").strip().lower())
    if hint is not None:
        return hint, "the checkpoint's modelspec.prediction_type"
    return None, ""


def _copy_configs(source: Path, out: Path) -> None:
    """Copy a diffusers folder's configs (never its weights: those come from the checkpoint) to ``out``, and
    write the CLIP vocabulary into tokenizer folders that lack it."""
    out.mkdir()
    shutil.copy2(source / "model_index.json", out / "model_index.json")
    for folder in (p for p in source.iterdir() if p.is_dir()):
        (out / folder.name).mkdir()
        for file in folder.iterdir():
            if file.is_file() and file.suffix in (".json", ".txt"):
                shutil.copy2(file, out / folder.name / file.name)
        tokenizer_config = out / folder.name / "tokenizer_config.json"
        if tokenizer_config.is_file() and not (out / folder.name / "vocab.json").is_file():
            settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            pad = settings.get("pad_token", EOS)
            pad = pad.get("content", EOS) if isinstance(pad, dict) else pad  # AddedToken form in older configs
            write_clip_tokenizer(out / folder.name, int(settings.get("model_max_length", 77)), pad_token=pad)


def _convert(path: Path, weights: Path, config_dir: Path, config_name: str, out: Path) -> Path:
    """Load ``weights`` with from_single_file and the configs in ``config_dir``; save it as a diffusers folder."""
    import diffusers
    import torch

    class_name = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    pipeline_class = getattr(diffusers, str(class_name), None)
    if pipeline_class is None or not hasattr(pipeline_class, "from_single_file"):
        raise ExportError(f"diffusers cannot load a {class_name} from a single file (configs {config_name})")
    log.info("converting %s to diffusers (%s, configs %s)", path, class_name, config_name)
    try:
        pipe = pipeline_class.from_single_file(str(weights), config=str(config_dir), local_files_only=True)
    except Exception as exc:  # diffusers raises many types on a file that does not fit the configs
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ExportError(
            f"cannot load {path} with the {config_name} configs: {type(exc).__name__}: {reason}"
        ) from None
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.named_parameters(), *component.named_buffers()]
            missing = [key for key, tensor in tensors if tensor.is_meta]  # left unloaded by from_single_file
            if missing:
                raise ExportError(
                    f"{path} lacks {len(missing)} {name} weights of the {config_name} configs (first: {missing[0]})"
                )
    pipe.save_pretrained(out, safe_serialization=True)
    # save_pretrained writes tokenizer.json only: add the vocab.json and merges.txt the export copies
    for vocab in config_dir.glob("*/vocab.json"):
        shutil.copytree(vocab.parent, out / vocab.parent.name, dirs_exist_ok=True)
    return out
