"""`sdtrt quantize DIR --int8`: record calibration inputs with the runtime's own pipeline, then quantize.

The UNet's inputs are recorded while the runtime draws each prompt (its own seed, the steps, guidance and
size asked for) on the openvino backend; export/quantize.py turns them into activation ranges (NNCF) and
writes the int8 IRs into the export. The face holds this because it stands on both the runtime, which
draws, and the export stage, which quantizes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.engine.artifact import Artifact
from sdtrt.engine.backends import choose_backend
from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.manifest import Manifest

log = logging.getLogger(__name__)

# varied subjects, styles and lighting: the built-in calibration set where no --prompts file is given
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse on a cliff at sunset",
    "portrait of an old fisherman, dramatic lighting, 85mm",
    "a red sports car on a wet city street at night, neon reflections",
    "an isometric illustration of a cozy kitchen, pastel colors",
    "a bowl of fruit on a wooden table, still life, oil painting",
    "a snowy mountain range under a starry sky",
    "a cute robot reading a book in a library, digital art",
)
MAX_PROMPTS = 1000


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """One prompt a line (blank lines skipped); one clear error for a file that cannot serve."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read prompts from {path}: {getattr(exc, 'strerror', None) or exc}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InvalidInputError(f"{path} holds no prompts (one a line)")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidInputError(f"{path} holds {len(prompts)} prompts; calibration takes at most {MAX_PROMPTS}")
    return prompts


class _RecordingRunner:
    """A NetworkRunner (runtime/runner.py) that keeps a copy of the inputs of ``networks``, then runs them."""

    def __init__(self, sessions: Any, networks: Sequence[str]) -> None:
        self.sessions = sessions  # the pipeline's own runner
        self.samples: dict[str, list[dict[str, np.ndarray]]] = {network: [] for network in networks}

    def run_all(self, network: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if network in self.samples:  # float32 as the loop made them: the CPU's fp32 graphs take them as they are
            self.samples[network].append({name: np.array(value) for name, value in feeds.items()})
        return self.sessions.run_all(network, **feeds)

    def run(self, network: str, **feeds: np.ndarray) -> np.ndarray:
        (output,) = self.run_all(network, **feeds).values()
        return output


def record_calibration(
    folder: Path,
    manifest: Manifest,
    networks: Sequence[str],
    prompts: Sequence[str],
    options: Mapping[str, Any],
) -> dict[str, list[dict[str, np.ndarray]]]:
    """The inputs ``networks`` ran on while the runtime drew each prompt (seed = its index) with ``options``."""
    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline(Artifact(folder, manifest, choose_backend("openvino"))) as pipe:
        recorder = _RecordingRunner(pipe.sessions, networks)
        for seed, prompt in enumerate(prompts):
            pipe.txt2img(prompt, seed=seed, decode=False, runner=recorder, **options)
            log.info("calibration %d/%d: %s", seed + 1, len(prompts), prompt)
    return recorder.samples


def quantize(
    folder: str | os.PathLike[str],
    *,
    prompts: Sequence[str] | None = None,
    steps: int = 20,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Quantize the export in ``folder`` to int8 (hybrid: see export/quantize.py), calibrated on ``prompts``
    (default: DEFAULT_PROMPTS) drawn at ``steps``, ``guidance`` and ``height`` x ``width`` (default: the model's
    native size); returns the new manifest. Run it again with ``overwrite`` to replace the int8 IRs."""
    from sdtrt.export.quantize import plan_quantization, quantize_export

    start = time.perf_counter()
    plan = plan_quantization(folder, overwrite)
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise InvalidInputError("calibration needs at least one prompt")
    options: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance}
    options |= {key: value for key, value in (("height", height), ("width", width)) if value is not None}
    samples = record_calibration(plan.folder, plan.manifest, plan.calibrated, prompts, options)
    calibration = {"prompts": len(prompts), **options}
    manifest = quantize_export(plan, samples, calibration)
    log.info("quantized %s to int8 in %.0f s", folder, time.perf_counter() - start)
    return manifest
