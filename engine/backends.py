"""Which backend runs the networks, and opening a component's session on it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Manifest
from sdtrt.engine.ort_session import OrtCpuSession, import_onnxruntime
from sdtrt.engine.session import Session

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort-cpu")


@dataclass(frozen=True)
class BackendChoice:
    kind: str  # one of BACKENDS but "auto"
    precision: str  # which ONNX variant it runs: "fp32" | "fp16"
    reason: str  # why this one, for the log and the result


def choose_backend(requested: str = "auto") -> BackendChoice:
    """Resolve ``requested`` to a concrete backend; an unavailable explicit request is a clear error."""
    if requested not in BACKENDS:
        raise InvalidInputError(f"unknown backend {requested!r} (choose from {', '.join(BACKENDS)})")
    import_onnxruntime()
    reason = "requested" if requested == "ort-cpu" else "ONNX Runtime CPU is the only backend in this build"
    choice = BackendChoice("ort-cpu", "fp32", reason)
    log.info("backend %s (%s): %s", choice.kind, choice.precision, choice.reason)
    return choice


def load_session(choice: BackendChoice, folder: str | os.PathLike[str], manifest: Manifest, component: str) -> Session:
    """Load ``component`` of the artifact folder on the chosen backend."""
    file = manifest.component_file(component, choice.precision)
    return OrtCpuSession(Path(folder) / file.path)
