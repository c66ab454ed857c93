"""Model weights are read from safetensors files only, unless the user allows pickles (``--allow-pickle``).

diffusers and transformers fall back to a pickled ``*.bin`` where a folder has no safetensors file, and
unpickling can run code hidden in the file. Every path of sdtrt that reads a model's weights (export of a
diffusers folder, a ControlNet, the base UNet of add-controlnet, single-file checkpoints) asks here first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtrt.engine.errors import ExportError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ALLOW_HINT = "convert it to .safetensors, or pass --allow-pickle (allow_pickle=True) if you trust its source"


def pickle_refusal(path: str | Path) -> ExportError:
    """The one error for pickled weights at ``path`` read without being allowed to."""
    return ExportError(f"{path} holds pickled weights; unpickling can run arbitrary code hidden in it: {ALLOW_HINT}")


def safetensors_only(folder: str | Path, allow_pickle: bool) -> dict[str, Any]:
    """The from_pretrained options that read the weights of the model ``folder`` (diffusers or transformers):
    safetensors only, unless ``allow_pickle``. One ExportError, before anything is loaded, where the folder holds
    its weights as pickles only."""
    if allow_pickle:
        return {}
    folder = Path(folder)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise pickle_refusal(pickled[0])
    return {"use_safetensors": True}
