"""Building TensorRT plans from the exported ONNX files (``sdtrt build DIR``, ``make engines``).

The network is parsed strongly typed: each layer runs in the precision its ONNX file states, so the
fp16 export gives an fp16 engine (timestep and the int32 token ids keep their types) on TensorRT 10
and 11 alike (11 has no weakly typed FP16 flag). One timing cache per plan folder is loaded before
and saved after each build, so later builds (other profiles, other networks) reuse measured tactics.

Networks with a weight map (the UNet and text encoders) are always built refittable, so that LoRA
adapters change their weights in place (TensorRTSession.set_weights): with REFIT_INDIVIDUAL only
the mapped weights — the Linear and Conv kernels LoRA adapts — are marked refittable, and TensorRT
stays free to fold and fuse everything else. Always rather than behind a build option: a plan that
cannot take a LoRA would only be found out when one is loaded, and then need a rebuild.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from sdtrt.engine.errors import BackendUnavailableError, InvalidInputError, SdtrtError
from sdtrt.engine.fsutil import write_bytes_atomic
from sdtrt.engine.manifest import PRECISIONS, Manifest, load_manifest
from sdtrt.engine.network_facts import NETWORK_FACTS, export_order
from sdtrt.engine.profiles import ProfileSpec, ShapeRange, component_dims, dynamic_profile, input_shapes
from sdtrt.engine.trt_plans import (
    TIMING_CACHE,
    PlanMeta,
    RuntimeInfo,
    import_tensorrt,
    plan_dir,
    plan_problems,
    read_candidates,
    runtime_info,
    trt_logger,
    write_plan,
)
from sdtrt.engine.weights import load_weight_map

log = logging.getLogger(__name__)


class EngineBuildError(SdtrtError):
    """TensorRT could not parse or build a network."""


def build_engines(
    folder: str | os.PathLike[str],
    profile: ProfileSpec | None = None,
    *,
    components: Sequence[str] | None = None,
    precision: str = "fp16",
    workspace_gib: float | None = None,
    force: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Build (or find cached) plans for ``components`` (default: all) of the artifact folder under ``profile``.

    ``profile`` defaults to the dynamic one (half to twice the native size, batch 1-4, CFG).
    With fp16 the VAE decoder also gets an fp32 plan where the export has one, for the NaN fallback.
    ``workspace_gib`` caps the builder's scratch memory; ``force`` rebuilds cached plans.
    """
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    manifest = load_manifest(folder)
    profile = profile or dynamic_profile(manifest)
    runtime = runtime_info()
    names = components or export_order(manifest.components)  # attached ControlNets too
    jobs = [(c, precision) for c in names]
    if precision == "fp16":  # the fp32 twins the NaN fallback runs (engine/backends.py: Fp32Fallback)
        twins = [c for c in names if NETWORK_FACTS[c].fp32_fallback and c in manifest.components]
        jobs += [(c, "fp32") for c in twins if "fp32" in manifest.components[c].files]
    log.info("building %s for %s: %s", profile.describe(), runtime.describe(), ", ".join(f"{c} {p}" for c, p in jobs))
    paths = []
    for component, prec in tqdm(jobs, desc="engines", unit="plan", disable=not progress):
        path, _ = ensure_plan(
            folder,
            manifest,
            component,
            prec,
            profile,
            runtime,
            workspace_gib=workspace_gib,
            force=force,
            progress=progress,
        )
        paths.append(path)
    return paths


def ensure_plan(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    component: str,
    precision: str,
    profile: ProfileSpec,
    runtime: RuntimeInfo,
    *,
    workspace_gib: float | None = None,
    force: bool = False,
    progress: bool = True,
    build: bool = True,
) -> tuple[Path, PlanMeta]:
    """The plan of ``component`` for exactly ``profile``: the cached one if it may be loaded, else a new build.

    With ``build`` False a missing plan is an error naming the command that builds it.
    """
    onnx = manifest.component_file(component, precision)
    shapes = input_shapes(onnx.inputs, component_dims(manifest, component, profile))
    directory = plan_dir(folder, runtime)
    meta = PlanMeta(
        component=component,
        precision=precision,
        onnx_sha256=onnx.sha256,
        profile=profile,
        shapes=shapes,
        trt_version=runtime.trt_version,
        compute_capability=runtime.compute_capability,
        gpu_name=runtime.gpu_name,
        plan_size=0,
        created="",
    )
    cached = read_candidates(directory).get(meta.sidecar_name)
    problems = ["none was built"] if cached is None else plan_problems(cached[0], runtime, cached[1])
    if not problems and not force:
        log.info("%s %s: cached %s", component, precision, directory / cached[0].plan_name)
        return directory / cached[0].plan_name, cached[0]
    if not build:
        raise BackendUnavailableError(
            f"no loadable TensorRT plan for {component} ({precision}, {profile.describe()}) in {directory} "
            f"({'; '.join(problems)}): build it with: {profile.command(folder)}"
        )
    if cached is not None and problems:
        log.warning("rebuilding %s %s: %s", component, precision, "; ".join(problems))
    log.info("building %s %s (%s); this takes a while", component, precision, profile.describe())
    plan = build_plan(
        Path(folder) / onnx.path,
        shapes,
        timing_cache=directory / TIMING_CACHE,
        workspace_bytes=None if workspace_gib is None else int(workspace_gib * 2**30),
        progress=progress,
        refittable=() if onnx.weights is None else tuple(load_weight_map(Path(folder) / onnx.weights).weights),
    )
    created = datetime.datetime.now(datetime.timezone.utc).isoformat()
    meta = dataclasses.replace(meta, plan_size=plan.nbytes, created=created)
    path = write_plan(directory, meta, plan)
    log.info("wrote %s (%.1f MiB)", path, meta.plan_size / 2**20)
    return path, meta


def build_plan(
    onnx_path: Path,
    shapes: dict[str, ShapeRange],
    *,
    timing_cache: Path,
    workspace_bytes: int | None = None,
    progress: bool = True,
    refittable: Sequence[str] = (),
):
    """Parse ``onnx_path`` strongly typed and build one plan whose single profile spans ``shapes``.

    Returns TensorRT's serialized engine (an IHostMemory, readable as a buffer). The timing cache
    at ``timing_cache`` is read first and written back after the build. ``refittable`` names the
    ONNX initializers the plan lets a Refitter change (REFIT_INDIVIDUAL); none: not refittable.
    """
    trt = import_tensorrt()
    logger = trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
        unknown = [name for name in refittable if not network.mark_weights_refittable(name)]
        if unknown:  # the plan still runs; a LoRA that changes these is refused when it is loaded
            log.warning(
                "%s: TensorRT cannot make %d weights of its weight map refittable (%s)",
                onnx_path.name,
                len(unknown),
                ", ".join(unknown[:3]),
            )
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # e.g. a cache from another GPU
        log.warning("%s does not fit this GPU or TensorRT; building with an empty timing cache", timing_cache)
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise EngineBuildError("TensorRT refused an empty timing cache (its log above says why)")
    if progress:
        config.progress_monitor = _progress_monitor(trt)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT could not build {onnx_path} (its log above says why)")
    write_bytes_atomic(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return plan


def _progress_monitor(trt):
    """TensorRT's build phases as tqdm bars (nested phases stack below their parent and vanish when done)."""

    class Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, tqdm] = {}
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self._depth[phase_name] = depth
            self._bars[phase_name] = tqdm(total=num_steps, desc=phase_name, unit="step", leave=depth == 0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()
            self._depth.pop(phase_name, None)

    return Progress()
