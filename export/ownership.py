"""Which folder `sdtrt export --overwrite` may replace: an earlier sdtrt export and nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sdtrt.engine.fsutil import LOCK_NAME
from sdtrt.engine.manifest import MANIFEST_NAME

# what an earlier export may hold: the files it wrote, its tokenizers, and the engines' caches (trt/, openvino/)
# (and the owner lock an earlier add-controlnet left behind)
EXPORT_ENTRIES = re.compile(
    r"manifest\.json|.+\.onnx|.+\.onnx\.data|.+\.weights\.json|tokenizer(_2)?|trt|openvino|" + re.escape(LOCK_NAME)
)
MANIFEST_KEYS = {"format_version", "family", "components"}  # in every sdtrt manifest, whatever its version


def export_refusal(folder: Path) -> str | None:
    """Why ``--overwrite`` may not replace the non-empty ``folder``, or None for an earlier sdtrt export.

    Only sdtrt's own files may go: a folder without an sdtrt manifest.json, or an export beside which the user
    keeps files of their own, is left as it is.
    """
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it is not empty and not an sdtrt export (no {MANIFEST_NAME})"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its {MANIFEST_NAME} is not an sdtrt manifest ({type(exc).__name__})"
    if not isinstance(manifest, dict) or not manifest.keys() >= MANIFEST_KEYS:
        return f"its {MANIFEST_NAME} is not an sdtrt manifest"
    foreign = sorted(entry.name for entry in folder.iterdir() if not EXPORT_ENTRIES.fullmatch(entry.name))
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"it is an sdtrt export but also holds files sdtrt did not write ({listed}); move them out first"
    return None
