"""TensorRT engine profiles: pure functions, no TensorRT, no GPU.

A ProfileSpec is what a user asks ``sdtrt build`` for, in image terms (pixel sizes, images per
batch, classifier-free guidance on or off). Each network turns it into its own ranges of dynamic
dimensions, by its batch rule (engine/network_facts.py): the UNet runs the conditional and unconditional
halves of a CFG step as one batch, so its batch doubles; the text encoders see the prompts, then the
negative prompts; the VAE sees one latent per image. This module is the one source of profiles: the
manifest names each input's dynamic dimensions, never their ranges. Plans built for a profile are
kept by the plan store (engine/trt_plans.py).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.engine.manifest import Manifest
from sdtrt.engine.network_facts import NETWORK_FACTS, Range, native_side_range
from sdtrt.engine.session import TensorSpec

DEFAULT_BATCH = (1, 4)  # images per request in the default dynamic profile (the UNet sees twice this with CFG)

Shape = tuple[int, ...]
# "latent_height_4": the latent height divided by 4 (the UNet's down-sampled sides, ControlNet residuals)
SCALED_LATENT_DIM = re.compile(r"(latent_height|latent_width)_([1-9][0-9]*)")
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
    if sizes is None:
        height = native_side_range(manifest.default_height, manifest.size_multiple)
        width = native_side_range(manifest.default_width, manifest.size_multiple)
        sizes = (height[0], width[0]), (height[2], width[2])
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
    """(min, opt, max) of each dynamic dimension of ``component``'s inputs under ``spec``."""
    f = manifest.vae_scale_factor
    images = {
        "batch": NETWORK_FACTS[component].batch_range(spec.batch, spec.cfg, spec.static),
        "height": spec.height,
        "width": spec.width,
        "latent_height": tuple(px // f for px in spec.height),
        "latent_width": tuple(px // f for px in spec.width),
    }
    dims = {}
    for file in manifest.components[component].files.values():
        for name in (dim for tensor in file.inputs for dim in tensor.shape if isinstance(dim, str)):
            if (scaled := SCALED_LATENT_DIM.fullmatch(name)) is not None:  # a ControlNet residual's side
                images[name] = tuple(side // int(scaled[2]) for side in images[scaled[1]])
            if name not in images:
                raise ManifestError(f"{component}: unknown dynamic dimension {name!r} in the manifest's inputs")
            dims[name] = images[name]
    return dims


def input_shapes(inputs: Sequence[TensorSpec], dims: Mapping[str, Range]) -> dict[str, ShapeRange]:
    """Per input: its (min, opt, max) shape once each dynamic dimension takes its range."""
    return {spec.name: tuple(spec.bind({k: v[i] for k, v in dims.items()}) for i in range(3)) for spec in inputs}


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
    rule = NETWORK_FACTS[component].batch  # the inverse of Network.batch_range
    if rule in ("cfg", "control"):  # a ControlNet in guess mode runs B: that too fits the CFG profile
        cfg = cfg and batch % 2 == 0  # an odd UNet batch is a run without guidance
        batch = batch // 2 if cfg else batch
    elif rule == "prompts" and cfg:
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
