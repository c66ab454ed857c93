"""What `sdtrt add-controlnet` is given: a diffusers ControlNet folder, a hub id, or one .safetensors file.

Each is checked to be a ControlNet before diffusers loads it (a UNet or a text encoder folder, a LoRA file:
one line saying what was given and what is expected, before any conversion or download), and its weights are
read from safetensors only unless pickles are allowed (export/pickles.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrt.engine.errors import ExportError, SdtrtError
from sdtrt.engine.fsutil import sha256_file, sha256_tree
from sdtrt.export.exporter import HUB_ID, _one_line
from sdtrt.export.pickles import safetensors_only

if TYPE_CHECKING:
    import torch

CONTROLNET_CLASS = "ControlNetModel"
# a single-file ControlNet has one of these keys (diffusers' own test: single_file_utils.CHECKPOINT_KEY_NAMES)
CONTROLNET_KEYS = ("control_model.time_embed.0.weight", "controlnet_cond_embedding.conv_in.weight")
EXPECTED = "add-controlnet takes a diffusers ControlNetModel folder, its hub id, or a ControlNet .safetensors file"


def load_controlnet(source: str | os.PathLike[str], allow_pickle: bool) -> tuple[torch.nn.Module, dict[str, str]]:
    """The ControlNetModel of a diffusers folder, a hub id or a single .safetensors file; and its source record."""
    from diffusers import ControlNetModel

    path = Path(source)
    try:
        if path.is_dir():
            check_folder(path)
            model = ControlNetModel.from_pretrained(path, **safetensors_only(path, allow_pickle))
            return model, {"path": str(path), "sha256": sha256_tree(path)}
        if path.is_file():
            check_file(path)
            return ControlNetModel.from_single_file(path), {"path": str(path), "sha256": sha256_file(path)}
        if not HUB_ID.match(str(source)):
            raise ExportError(f"no ControlNet at {path}")
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "diffusion_pytorch_model.safetensors"]
        downloaded = Path(snapshot_download(str(source), allow_patterns=patterns))
        check_folder(downloaded, str(source))
        model = ControlNetModel.from_pretrained(downloaded, use_safetensors=True)
        return model, {"path": str(source), "sha256": sha256_tree(downloaded)}
    except SdtrtError:
        raise
    except Exception as exc:  # diffusers, the hub client, safetensors: many types, long messages
        raise ExportError(f"cannot load the ControlNet {source}: {_one_line(exc)}") from exc


def check_folder(folder: Path, name: str | None = None) -> None:
    """One ExportError unless ``folder``'s config.json describes a diffusers ControlNetModel."""
    name = name or str(folder)
    if (folder / "model_index.json").is_file():
        hint = f" (its ControlNet: {folder / 'controlnet'})" if (folder / "controlnet").is_dir() else ""
        raise ExportError(f"{name} is a diffusers pipeline folder, not a ControlNet{hint}; {EXPECTED}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{name} is not a diffusers ControlNet folder (no config.json); {EXPECTED}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {folder / 'config.json'}: {exc}") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != CONTROLNET_CLASS:
        architectures = config.get("architectures") if isinstance(config, dict) else None
        what = kind or (architectures[0] if isinstance(architectures, list) and architectures else "unknown model")
        raise ExportError(f"{name} holds a {what}, not a ControlNet; {EXPECTED}")


def check_file(path: Path) -> None:
    """One ExportError unless ``path`` is a .safetensors file with a ControlNet's keys (a LoRA, a whole
    checkpoint are not)."""
    if path.suffix != ".safetensors":
        raise ExportError(f"{path}: a single-file ControlNet must be .safetensors; {EXPECTED}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
    except (OSError, SafetensorError) as exc:
        raise ExportError(f"{path} is not a readable .safetensors file: {exc}") from None
    if not keys.intersection(CONTROLNET_KEYS):
        kind = "a LoRA adapter" if any("lora" in key for key in keys) else "no ControlNet"
        raise ExportError(f"{path} holds {kind} (none of a ControlNet's keys); {EXPECTED}")
