"""TensorRT engine profiles, plan cache keys and plan compatibility: pure functions, no TensorRT, no GPU.

A ProfileSpec is what a user asks ``sdtrt build`` for, in image terms (pixel sizes, images per
batch, classifier-free guidance on or off). Each network turns it into its own ranges of dynamic
dimensions: the UNet runs the conditional and unconditional halves of a CFG step as one batch, so
its batch doubles; the text encoder sees the prompts, then the negative prompts; the VAE sees one
latent per image. A built plan is keyed by what makes it invalid (the ONNX content hash, the
precision, the input shape ranges) and stored under a folder named by the GPU's compute capability
and the TensorRT version, with a JSON sidecar that is checked before the plan is ever deserialized.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.engine.manifest import Manifest
from sdtrt.engine.session import TensorSpec

PLAN_FORMAT = 1
DEFAULT_BATCH = (1, 4)  # images per request in the default dynamic profile (the UNet sees twice this with CFG)

Range = tuple[int, int, int]  # (min, opt, max)
Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max) shapes of one input


@dataclass(frozen=True)
class ProfileSpec:
    """An engine profile in image terms: pixel sizes and images per batch, each as (min, opt, max)."""

    height: Range
    width: Range
    batch: Range
    cfg: bool = True  # the UNet batch holds a conditional and an unconditional half

    @property
    def static(self) -> bool:
        return all(lo == hi for lo, _, hi in (self.height, self.width, self.batch))

    def describe(self) -> str:
        """One short phrase naming the profile, e.g. "static 512x512, batch 1"."""
        cfg = "" if self.cfg else ", no CFG"
        if self.static:
            return f"static {self.height[0]}x{self.width[0]}, batch {self.batch[0]}{cfg}"
        sides = f"{_span(self.height)} x {_span(self.width)} px"
        return f"dynamic {sides}, batch {_span(self.batch)}{cfg}"

    def command(self, folder: str | os.PathLike[str]) -> str:
        """The ``sdtrt build`` command line that builds this profile."""
        cfg = "" if self.cfg else " --no-cfg"
        if self.static:
            return f"sdtrt build {folder} --static {self.height[0]}x{self.width[0]} --batch {self.batch[0]}{cfg}"
        sides = f"{self.height[0]}-{self.height[2]}"
        if self.width[::2] != self.height[::2]:
            sides = f"{self.height[0]}x{self.width[0]}-{self.height[2]}x{self.width[2]}"
        return f"sdtrt build {folder} --dynamic {sides} --batch {self.batch[0]}-{self.batch[2]}{cfg}"

    def to_dict(self) -> dict:
        return {"height": list(self.height), "width": list(self.width), "batch": list(self.batch), "cfg": self.cfg}

    @classmethod
    def from_dict(cls, d: Mapping) -> ProfileSpec:
        return cls(_range(d["height"]), _range(d["width"]), _range(d["batch"]), bool(d["cfg"]))


def _span(r: Range) -> str:
    return str(r[0]) if r[0] == r[2] else f"{r[0]}-{r[2]}"


def _range(values: Sequence) -> Range:
    lo, opt, hi = (int(v) for v in values)
    return lo, opt, hi


# --- building a ProfileSpec from what the user typed --------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """ "512x768" -> (512, 768) as (height, width); "512" -> (512, 512)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise InvalidInputError(f"size {text!r} is not HEIGHTxWIDTH in pixels, e.g. 512x512")
    height = int(match[1])
    return height, int(match[2] or height)


def parse_range(text: str, what: str) -> tuple[str, str]:
    """ "256-1024" -> ("256", "1024"); "4" -> ("4", "4")."""
    parts = [p.strip() for p in text.split("-")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not all(parts):
        raise InvalidInputError(f"{what} {text!r} is not MIN-MAX (or one value)")
    return parts[0], parts[1]


def parse_batch(text: str) -> tuple[int, int]:
    """ "1-4" -> (1, 4); "2" -> (2, 2)."""
    lo, hi = parse_range(text, "batch")
    if not (lo.isdigit() and hi.isdigit()):
        raise InvalidInputError(f"batch {text!r} is not a count or MIN-MAX, e.g. 1 or 1-4")
    return int(lo), int(hi)


def parse_profile(
    manifest: Manifest,
    static: str | None = None,
    dynamic: str | None = None,
    batch: str | None = None,
    cfg: bool = True,
) -> ProfileSpec:
    """The profile of ``sdtrt build``'s options: ``--static HxW`` or ``--dynamic MIN-MAX``, ``--batch N|MIN-MAX``.

    Neither: the default dynamic profile. Batch defaults to 1 with --static and 1-4 otherwise.
    """
    if static is not None and dynamic is not None:
        raise InvalidInputError("give --static or --dynamic, not both")
    if static is not None:
        lo, hi = parse_batch(batch or "1")
        if lo != hi:
            raise InvalidInputError(f"a static profile has one batch size, not {batch!r}: e.g. --batch 2")
        return static_profile(manifest, parse_size(static), lo, cfg)
    sizes = None
    if dynamic is not None:
        lo_text, hi_text = parse_range(dynamic, "size range")
        sizes = parse_size(lo_text), parse_size(hi_text)
    return dynamic_profile(manifest, sizes, parse_batch(batch or "{}-{}".format(*DEFAULT_BATCH)), cfg)


def static_profile(manifest: Manifest, size: tuple[int, int], batch: int, cfg: bool = True) -> ProfileSpec:
    """One fixed image size and batch: the fastest engines, and the only shapes they accept."""
    height, width = size
    spec = ProfileSpec((height,) * 3, (width,) * 3, (batch,) * 3, cfg)
    check_profile(manifest, spec)
    return spec


def dynamic_profile(
    manifest: Manifest,
    sizes: tuple[tuple[int, int], tuple[int, int]] | None = None,
    batch: tuple[int, int] = DEFAULT_BATCH,
    cfg: bool = True,
) -> ProfileSpec:
    """A range of sizes ((min h, min w), (max h, max w)) and batches, tuned for the model's native size.

    Without ``sizes``: half to twice the native size (256-1024 px for Stable Diffusion 1.5).
    """
    step = manifest.size_multiple
    if sizes is None:
        h, w = manifest.default_height, manifest.default_width
        sizes = (max(step, h // 2 // step * step), max(step, w // 2 // step * step)), (2 * h, 2 * w)
    (min_h, min_w), (max_h, max_w) = sizes
    opt_h = min(max(manifest.default_height, min_h), max_h)
    opt_w = min(max(manifest.default_width, min_w), max_w)
    spec = ProfileSpec((min_h, opt_h, max_h), (min_w, opt_w, max_w), (batch[0], batch[0], batch[1]), cfg)
    check_profile(manifest, spec)
    return spec


def check_profile(manifest: Manifest, spec: ProfileSpec) -> None:
    """One clear error for a profile the model cannot be built for."""
    for what, (lo, opt, hi) in (("height", spec.height), ("width", spec.width)):
        if not 0 < lo <= opt <= hi:
            raise InvalidInputError(f"profile {what} {lo}..{hi} must be positive with min <= max")
        for size in (lo, opt, hi):
            if size % manifest.size_multiple:
                raise InvalidInputError(
                    f"profile {what} {size} is not a multiple of {manifest.size_multiple}, which this model needs"
                )
    lo, opt, hi = spec.batch
    if not 1 <= lo <= opt <= hi:
        raise InvalidInputError(f"profile batch {lo}..{hi} must be at least 1 with min <= max")


# --- from a ProfileSpec to each network's input shapes --------------------------------------------


def component_dims(manifest: Manifest, component: str, spec: ProfileSpec) -> dict[str, Range]:
    """(min, opt, max) of each dynamic dimension of ``component`` under ``spec``."""
    f = manifest.vae_scale_factor
    images = {
        "batch": _batch_range(manifest, component, spec),
        "height": spec.height,
        "width": spec.width,
        "latent_height": tuple(px // f for px in spec.height),
        "latent_width": tuple(px // f for px in spec.width),
    }
    dims = {}
    for name in manifest.components[component].profile:
        if name not in images:
            raise ManifestError(f"{component}: unknown dynamic dimension {name!r} in the manifest's profile")
        dims[name] = images[name]
    return dims


def _batch_range(manifest: Manifest, component: str, spec: ProfileSpec) -> Range:
    lo, opt, hi = spec.batch
    factor = 2 if spec.cfg else 1
    if component == "unet":  # (2B, ...) with CFG; a dynamic profile also keeps B for guidance <= 1
        if spec.static:
            return factor * lo, factor * opt, factor * hi
        return lo, factor * opt, factor * hi
    if component in manifest.tokenizers:  # every text encoder: once per prompt, then per negative prompt
        return 1, opt, factor * hi
    if component == "vae_encoder":  # one source (or masked) image, repeated in latent space
        return 1, 1, hi
    return lo, opt, hi


def input_shapes(inputs: Sequence[TensorSpec], dims: Mapping[str, Range]) -> dict[str, ShapeRange]:
    """Per input: its (min, opt, max) shape once each dynamic dimension takes its range."""
    return {spec.name: tuple(spec.bind({k: v[i] for k, v in dims.items()}) for i in range(3)) for spec in inputs}


# --- the plan cache ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeInfo:
    """What a plan is tied to: the TensorRT version that builds or loads it and the GPU it runs on."""

    trt_version: str  # tensorrt.__version__, e.g. "10.8.0.43"
    compute_capability: tuple[int, int]  # (9, 0) for H100
    gpu_name: str

    @property
    def folder_name(self) -> str:
        major, minor = self.compute_capability
        return f"sm{major}{minor}-trt{self.trt_version}"

    def describe(self) -> str:
        major, minor = self.compute_capability
        return f"TensorRT {self.trt_version} on {self.gpu_name} (sm{major}{minor})"


def plan_dir(folder: str | os.PathLike[str], runtime: RuntimeInfo) -> Path:
    """DIR/trt/<compute capability>-trt<version>/: plans, their sidecars and the timing cache."""
    return Path(folder) / "trt" / runtime.folder_name


def plan_key(onnx_sha256: str, precision: str, shapes: Mapping[str, ShapeRange]) -> str:
    """16 hex digits over everything in a plan that the folder name does not already pin."""
    payload = {
        "format": PLAN_FORMAT,
        "onnx": onnx_sha256,
        "precision": precision,
        "shapes": {name: [list(s) for s in shapes[name]] for name in sorted(shapes)},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlanMeta:
    """The JSON sidecar written beside each plan: what it was built from, by what, for which GPU."""

    component: str
    precision: str
    onnx_sha256: str
    profile: ProfileSpec
    shapes: dict[str, ShapeRange]
    trt_version: str
    compute_capability: tuple[int, int]
    gpu_name: str
    plan_size: int  # bytes, checked before deserializing
    created: str  # ISO 8601 UTC; the newest compatible plan wins when several match
    format: int = PLAN_FORMAT

    @property
    def key(self) -> str:
        return plan_key(self.onnx_sha256, self.precision, self.shapes)

    @property
    def plan_name(self) -> str:
        return f"{self.component}.{self.key}.plan"

    @property
    def sidecar_name(self) -> str:
        return f"{self.component}.{self.key}.json"

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "component": self.component,
            "precision": self.precision,
            "onnx_sha256": self.onnx_sha256,
            "profile": self.profile.to_dict(),
            "shapes": {name: [list(s) for s in r] for name, r in self.shapes.items()},
            "trt_version": self.trt_version,
            "compute_capability": list(self.compute_capability),
            "gpu_name": self.gpu_name,
            "plan_size": self.plan_size,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> PlanMeta:
        major, minor = (int(v) for v in d["compute_capability"])
        return cls(
            format=int(d["format"]),
            component=str(d["component"]),
            precision=str(d["precision"]),
            onnx_sha256=str(d["onnx_sha256"]),
            profile=ProfileSpec.from_dict(d["profile"]),
            shapes={str(k): tuple(tuple(int(x) for x in s) for s in v) for k, v in d["shapes"].items()},
            trt_version=str(d["trt_version"]),
            compute_capability=(major, minor),
            gpu_name=str(d["gpu_name"]),
            plan_size=int(d["plan_size"]),
            created=str(d["created"]),
        )


def plan_problems(meta: PlanMeta, runtime: RuntimeInfo, plan_size: int | None) -> list[str]:
    """Why a plan must not be deserialized here (empty when it may be).

    A plan only loads in the TensorRT version that built it, on a GPU of the same compute
    capability; loading anything else can fail deep inside TensorRT, so it is refused up front.
    """
    problems = []
    if meta.format != PLAN_FORMAT:
        problems.append(f"sidecar format {meta.format}, this sdtrt writes {PLAN_FORMAT}")
    if meta.trt_version != runtime.trt_version:
        problems.append(f"built by TensorRT {meta.trt_version}, this is TensorRT {runtime.trt_version}")
    if meta.compute_capability != runtime.compute_capability:
        built = "sm{}{}".format(*meta.compute_capability)
        here = "sm{}{}".format(*runtime.compute_capability)
        problems.append(f"built for {meta.gpu_name} ({built}), this GPU is {runtime.gpu_name} ({here})")
    if plan_size is None:
        problems.append("the plan file is missing")
    elif plan_size != meta.plan_size:
        problems.append(f"the plan file has {plan_size} bytes, its sidecar says {meta.plan_size}")
    return problems


def plan_warnings(meta: PlanMeta, runtime: RuntimeInfo) -> list[str]:
    """Reasons to be wary of a loadable plan: another GPU model of the same compute capability."""
    if meta.compute_capability == runtime.compute_capability and meta.gpu_name != runtime.gpu_name:
        return [f"built on {meta.gpu_name}, running on {runtime.gpu_name}: it loads, but may run slower"]
    return []


def select_plan(
    candidates: Mapping[str, tuple[PlanMeta, int | None]],
    component: str,
    precision: str,
    onnx_sha256: str,
    runtime: RuntimeInfo,
) -> tuple[PlanMeta | None, list[str]]:
    """The newest loadable plan of ``component`` built from this ONNX file at this precision.

    ``candidates`` maps a sidecar's name to its metadata and its plan's size on disk (None when
    missing). Returns the choice and one line per plan of this network that was passed over.
    """
    chosen: PlanMeta | None = None
    passed_over = []
    for name, (meta, size) in sorted(candidates.items()):
        if meta.component != component or meta.precision != precision:
            continue
        if meta.onnx_sha256 != onnx_sha256:
            passed_over.append(f"{name}: built from another export of {component} (the ONNX file changed)")
            continue
        if problems := plan_problems(meta, runtime, size):
            passed_over.append(f"{name}: {'; '.join(problems)}")
            continue
        if chosen is None or meta.created > chosen.created:
            chosen = meta
    return chosen, passed_over


# --- requests against a built profile ---------------------------------------------------------------


def bound_dims(inputs: Mapping[str, TensorSpec], shapes: Mapping[str, Shape]) -> dict[str, int]:
    """The value each named dynamic dimension takes in ``shapes`` (feeds already passed check_feeds)."""
    dims: dict[str, int] = {}
    for name, spec in inputs.items():
        for dim, size in zip(spec.shape, shapes[name], strict=True):
            if isinstance(dim, str):
                dims[dim] = size
    return dims


def suggest_profile(manifest: Manifest, component: str, dims: Mapping[str, int], built: ProfileSpec) -> ProfileSpec:
    """A static profile that serves a request with these dimension values (for the error's hint)."""
    f = manifest.vae_scale_factor
    height = dims["latent_height"] * f if "latent_height" in dims else dims.get("height", built.height[1])
    width = dims["latent_width"] * f if "latent_width" in dims else dims.get("width", built.width[1])
    batch, cfg = dims.get("batch", built.batch[1]), built.cfg
    if component == "unet":
        cfg = cfg and batch % 2 == 0  # an odd UNet batch is a run without guidance
        batch = batch // 2 if cfg else batch
    elif component in manifest.tokenizers and cfg:
        batch = math.ceil(batch / 2)
    return ProfileSpec((height,) * 3, (width,) * 3, (batch,) * 3, cfg)


def check_in_profile(
    component: str,
    shapes: Mapping[str, Shape],
    ranges: Mapping[str, ShapeRange],
    profile: ProfileSpec,
    hint: Callable[[], str],
) -> None:
    """Raise one clear error when a shape falls outside the profile the engine was built for.

    ``hint()`` gives the command that builds an engine serving the request (asked only on error).
    """
    for name, shape in shapes.items():
        lo, _, hi = ranges[name]
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
            span = str(lo) if lo == hi else f"{lo} to {hi}"
            raise InvalidInputError(
                f"{component}: input {name!r} has shape {tuple(shape)}, outside the TensorRT profile "
                f"this engine was built for ({profile.describe()}: {name} {span}); "
                f"build an engine for it with: {hint()}"
            )
