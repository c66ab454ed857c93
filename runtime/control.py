"""ControlNet conditioning: the options (diffusers' names and semantics), their checks, the control images, and
the residuals the ControlNets add to the UNet at each step.

A request names the attached ControlNets to use (``controlnet``; default: every one the export has, in the
order they were attached), one control image each (``control_image``), and per network a conditioning scale
and a guidance window (``controlnet_conditioning_scale``, ``control_guidance_start`` / ``_end``: fractions of
the steps the call runs; a number applies to every network). ``guess_mode`` runs the ControlNets on the
conditional half of the CFG batch only, their residuals ramped from 0.1 to 1 over the down blocks, as
diffusers does (and turned on by a ControlNet with ``global_pool_conditions``).

Each control image is resized (Lanczos, aspect ratio not kept: no crop) to the generation size, RGB in [0, 1],
as diffusers' control image processor does. The residuals of several ControlNets add up; a network outside its
window (or at scale 0) does not run, and a step where none runs uses the plain UNet — both change nothing,
since diffusers adds their residuals times 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.network_facts import CONTROLNET_PREFIX
from sdtrt.engine.session import TensorSpec
from sdtrt.runtime import image as image_ops
from sdtrt.runtime.request import is_real
from sdtrt.runtime.runner import NetworkRunner
from sdtrt.runtime.sessions import Sessions

CONTROL_OPTIONS = (
    "controlnet",
    "control_image",
    "controlnet_conditioning_scale",
    "control_guidance_start",
    "control_guidance_end",
    "guess_mode",
)
UNET_CONTROLNET = "unet_controlnet"


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a request: its name, control image, scale and guidance window."""

    name: str
    image: Image.Image
    scale: float
    start: float
    end: float

    @property
    def network(self) -> str:
        return CONTROLNET_PREFIX + self.name

    def keep(self, index: int, count: int) -> float:
        """Whether step ``index`` of ``count`` lies in this network's window: diffusers' controlnet_keep."""
        return 1.0 - float(index / count < self.start or (index + 1) / count > self.end)


class Control:
    """The checked ControlNet options of one request, and the residuals they add at each step of a denoising run."""

    def __init__(self, sessions: Sessions, units: Sequence[ControlUnit], guess_mode: bool) -> None:
        self.sessions = sessions
        self.units = tuple(units)
        self.guess_mode = guess_mode
        controlnets = sessions.artifact.manifest.controlnets
        self.pooled = {u.name: bool(controlnets[u.name].get("global_pool_conditions")) for u in units}
        self.residuals_in = residual_inputs(sessions.inputs(UNET_CONTROLNET))  # what unet_controlnet takes
        self.seconds = 0.0  # spent running the ControlNets
        self._run: tuple[NetworkRunner, int, bool, list[np.ndarray]] | None = None  # runner, steps, cfg, images

    @property
    def first_image(self) -> Image.Image:
        return self.units[0].image

    def begin(self, runner: NetworkRunner, steps: int, batch: int, cfg: bool, height: int, width: int) -> None:
        """Start a denoising run of ``steps`` steps over ``batch`` images of ``height`` x ``width``, its ControlNets
        run by ``runner``: the control images at that size, one row per image (twice, for both CFG halves, unless
        in guess mode)."""
        rows = 2 * batch if cfg and not self.guess_mode else batch
        images = [np.repeat(control_pixels(unit.image, height, width), rows, axis=0) for unit in self.units]
        self._run = runner, steps, cfg, images

    def residuals(
        self, index: int, model_input: np.ndarray, timestep: np.ndarray, feeds: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The residual inputs of unet_controlnet at step ``index`` of the run (counted from its first step), or
        {} where no ControlNet runs. ``model_input`` (2B or B, C, h, w) is the scaled latents, ``feeds`` the UNet's
        conditioning: both halves under CFG, the unconditional first."""
        assert self._run is not None, "begin() starts a run"
        runner, steps, cfg, images = self._run
        t0 = time.perf_counter()
        half = model_input.shape[0] // 2 if self.guess_mode and cfg else 0  # guess mode: the conditional half
        total: list[np.ndarray] | None = None
        for unit, image in zip(self.units, images, strict=True):
            scale = unit.scale * unit.keep(index, steps)
            if scale == 0.0:  # diffusers adds this network's residuals times 0
                continue
            inputs = self.sessions.inputs(unit.network)
            conditioning = {name: value[half:] for name, value in feeds.items() if name in inputs}
            outputs = runner.run_all(
                unit.network, sample=model_input[half:], timestep=timestep[half:], controlnet_cond=image, **conditioning
            )
            scaled = [
                outputs[spec.name] * s for spec, s in zip(self.residuals_in, self._scales(unit, scale), strict=True)
            ]
            total = scaled if total is None else [a + b for a, b in zip(total, scaled, strict=True)]
        self.seconds += time.perf_counter() - t0
        if total is None:
            return {}
        batch, _, height, width = model_input.shape
        residuals = {}
        for spec, value in zip(self.residuals_in, total, strict=True):
            value = np.broadcast_to(value, residual_shape(spec, batch - half, height, width))  # pooled: (B, C, 1, 1)
            if half:  # the unconditional half gets no residuals
                value = np.concatenate([np.zeros_like(value), value])
            residuals[spec.name] = np.ascontiguousarray(value, dtype=np.float32)
        return residuals

    def _scales(self, unit: ControlUnit, scale: float) -> list[np.float32]:
        """Per residual: the scale, ramped from 0.1 to 1 in guess mode (diffusers' ControlNetModel)."""
        count = len(self.residuals_in)
        if self.guess_mode and not self.pooled[unit.name]:
            ramp = np.logspace(-1.0, 0.0, count).astype(np.float32)  # torch.logspace(-1, 0, n) in float32
            return list(ramp * np.float32(scale))
        return [np.float32(scale)] * count


def control_pixels(image: Image.Image, height: int, width: int) -> np.ndarray:
    """A control image -> (1, 3, height, width) float32 in [0, 1], resized (Lanczos) as diffusers' control image
    processor does (the aspect ratio is not kept)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    return (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]


def residual_inputs(inputs: Mapping[str, TensorSpec]) -> list[TensorSpec]:
    """The residual inputs of unet_controlnet, in order: down_residual_0 ... then mid_residual."""
    return [s for name, s in inputs.items() if name.startswith("down_residual_") or name == "mid_residual"]


def residual_shape(spec: TensorSpec, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    """A residual's shape for latents of ``height`` x ``width``: its sides are "latent_height" or
    "latent_height_<n>" (a 1/n of it)."""

    def side(dim: Any, latent: int) -> int:
        if isinstance(dim, int):
            return dim
        divisor = dim.rpartition("_")[2]
        return latent // int(divisor) if divisor.isdigit() else latent

    return batch, int(spec.shape[1]), side(spec.shape[2], height), side(spec.shape[3], width)


# --------------------------------------------------------------------------------------------------
# The options and their checks (all before any network runs)

# controlnet_conditioning_scale when none is given, as diffusers' ControlNet pipelines default it:
# (task, family) first, then (task, None)
DEFAULT_SCALES: dict[tuple[str, str | None], float] = {
    ("txt2img", None): 1.0,
    ("img2img", None): 0.8,
    ("inpaint", None): 0.5,
    ("inpaint", "sdxl"): 1.0,
}


def check_control(task: str, given: dict[str, Any], sessions: Sessions, control_tasks: Sequence[str]) -> Control | None:
    """The ControlNet options ``given`` to ``task`` (one of ``control_tasks`` takes them), checked; None when
    there are none. One clear error for
    anything wrong: a task without ControlNets, an unknown name, the wrong count of images, an unreadable one,
    a scale that is not finite, a window outside [0, 1] or reversed, a ControlNet that does not fit the UNet."""
    if not given or all(value is None for value in given.values()):
        return None
    if task not in control_tasks:
        raise InvalidInputError(f"{task} takes no ControlNet ({', '.join(given)}): {', '.join(control_tasks)} do")
    artifact = sessions.artifact
    attached = list(artifact.manifest.controlnets)
    if not attached:
        raise InvalidInputError(
            f"{artifact.folder} has no ControlNet: attach one with `sdtrt add-controlnet {artifact.folder} CONTROLNET`"
        )
    names = _names(given.get("controlnet"), attached)
    count = len(names)
    images = given.get("control_image")
    if images is None:
        raise InvalidInputError(f"ControlNet {', '.join(names)} needs a control_image")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) != count:
        raise InvalidInputError(
            f"{count} ControlNet(s) ({', '.join(names)}) take {count} control image(s), got {len(images)}"
        )
    default_scale = DEFAULT_SCALES.get((task, artifact.manifest.family), DEFAULT_SCALES[task, None])
    scales = _per_net("controlnet_conditioning_scale", given.get("controlnet_conditioning_scale", default_scale), count)
    starts = _per_net("control_guidance_start", given.get("control_guidance_start", 0.0), count)
    ends = _per_net("control_guidance_end", given.get("control_guidance_end", 1.0), count)
    for start, end in zip(starts, ends, strict=True):
        if not 0.0 <= start < end <= 1.0:
            raise InvalidInputError(
                f"a ControlNet guidance window must lie in [0, 1] with start < end, got {start!r} to {end!r}"
            )
    guess_mode = given.get("guess_mode", False)
    if not isinstance(guess_mode, bool):
        raise InvalidInputError(f"guess_mode must be True or False, got {guess_mode!r}")
    for name in names:
        _check_fits(sessions, name)
    loaded = [image_ops.load_rgb(image, f"control image for {name}") for name, image in zip(names, images, strict=True)]
    units = [ControlUnit(*unit) for unit in zip(names, loaded, scales, starts, ends, strict=True)]
    pooled = artifact.manifest.controlnets[names[0]].get("global_pool_conditions", False)
    return Control(sessions, units, guess_mode or bool(pooled))  # diffusers: the first network's pooling decides


def _names(value: Any, attached: list[str]) -> list[str]:
    names = attached if value is None else [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise InvalidInputError(f"controlnet must be a ControlNet's name or a list of them, got {value!r}")
    if unknown := [n for n in names if n not in attached]:
        raise InvalidInputError(f"no ControlNet named {unknown[0]!r} is attached (attached: {', '.join(attached)})")
    return list(names)


def _per_net(option: str, value: Any, count: int) -> list[float]:
    """A number for every network, or a list of one per network; each finite."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise InvalidInputError(f"{option} has {len(values)} values for {count} ControlNet(s)")
    for v in values:
        if not is_real(v) or not math.isfinite(v):
            raise InvalidInputError(f"{option} must be a finite number (or one per ControlNet), got {v!r}")
    return [float(v) for v in values]


def _check_fits(sessions: Sessions, name: str) -> None:
    """One error when ControlNet ``name``'s residuals or text width do not match what unet_controlnet takes."""
    artifact = sessions.artifact
    if UNET_CONTROLNET not in artifact:
        raise artifact.manifest.damaged(artifact.folder, f"{artifact.folder} has ControlNets but no {UNET_CONTROLNET}")
    unet = sessions.inputs(UNET_CONTROLNET)
    file = artifact.file(CONTROLNET_PREFIX + name)
    inputs = {spec.name: spec for spec in file.inputs}
    theirs = [(s.name, s.shape[1]) for s in file.outputs]
    ours = [(s.name, s.shape[1]) for s in residual_inputs(unet)]
    width, unet_width = inputs["encoder_hidden_states"].shape[-1], unet["encoder_hidden_states"].shape[-1]
    if theirs != ours or width != unet_width or inputs["controlnet_cond"].shape[1] != 3:
        raise InvalidInputError(
            f"ControlNet {name!r} does not fit this export's UNet (residuals {[c for _, c in theirs]} and text width "
            f"{width}, the UNet takes {[c for _, c in ours]} and {unet_width}, RGB control images): "
            "a ControlNet for another base model?"
        )
