"""One handler per sdtrt command, each taking the parsed arguments (sdtrt/cli.py parses them and dispatches)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrt.demo import run_demo
from sdtrt.engine.errors import InvalidInputError, SdtrtError
from sdtrt.generate import generate_images
from sdtrt.task_cli import task_options

if TYPE_CHECKING:
    from sdtrt.engine.manifest import ComponentFile


def export(args: argparse.Namespace) -> None:
    from sdtrt.export.exporter import export_model

    export_model(
        args.model,
        args.out,
        precisions=args.precision,
        components=args.components,
        opset=args.opset,
        overwrite=args.overwrite,
        progress=not args.quiet,
        config=args.config,
        prediction_type=args.prediction_type,
        allow_pickle=args.allow_pickle,
        ort_fused=args.ort_fused,
    )
    if args.step_cache:
        from sdtrt.export.step_cache import attach_step_cache

        attach_step_cache(args.out, base=args.model, opset=args.opset)
    print(f"exported {args.model} to {args.out}")


def run_task(args: argparse.Namespace) -> None:
    """A drawing command (generate, img2img, ...: one per task in sdtrt.runtime.tasks): the pipeline's ``args.task``."""
    from sdtrt.runtime.tasks import TASKS

    task = TASKS[args.task]
    options = task_options(task, args)
    generate_images(
        task.name, args.folder, args.prompt, args.out, args.quiet, args.backend, args.lora, args.precision, **options
    )


def add_tiny_vae(args: argparse.Namespace) -> None:
    from sdtrt.export.tiny_vae import attach_tiny_vae

    attach_tiny_vae(args.folder, args.tiny_vae, overwrite=args.overwrite)
    print(f"attached the tiny VAE {args.tiny_vae} to {args.folder}")


def add_step_cache(args: argparse.Namespace) -> None:
    from sdtrt.export.step_cache import attach_step_cache

    attach_step_cache(args.folder, branch=args.branch, base=args.base, overwrite=args.overwrite)
    print(f"attached the step-cache graphs (branch {args.branch}) to {args.folder}")


def add_controlnet(args: argparse.Namespace) -> None:
    from sdtrt.export.controlnet import attach_controlnet

    options = {"name": args.name, "base": args.base, "overwrite": args.overwrite, "allow_pickle": args.allow_pickle}
    manifest = attach_controlnet(args.folder, args.controlnet, **options)
    print(f"attached {args.controlnet} to {args.folder} (ControlNets: {', '.join(manifest.controlnets)})")


def info(args: argparse.Namespace) -> None:
    from sdtrt.engine.manifest import load_manifest
    from sdtrt.engine.profiles import component_dims, dynamic_profile

    folder = args.folder
    m = load_manifest(folder)
    print(
        f"{folder}: {m.family}, {m.prediction_type}, native {m.default_width}x{m.default_height}, "
        f"sizes in multiples of {m.size_multiple}"
    )
    print(f"source: {m.source.get('path')} (sha256 {m.source.get('sha256', '')[:12]})")
    tokenizers = ", ".join(f"{tok}/" for tok in m.tokenizers.values())
    print(f"scheduler: {m.scheduler.get('_class_name')}   tokenizers: {tokenizers} ({m.text_max_length} tokens)")
    for name, component in m.components.items():
        listed = [
            *component.files.items(),
            *((f"{p} ORT-fused", f) for p, f in component.ort_fused.items()),
            *((f"{p} OpenVINO IR", f) for p, f in component.openvino.items()),  # sdtrt quantize --int8
            *((f"{p} ORT QDQ", f) for p, f in component.onnxruntime.items()),
        ]
        files = ", ".join(f"{p}: {f.path} ({_mib(folder, f)})" for p, f in listed)
        print(f"  {name}: {files}")
    fp16 = any("fp16" in component.files for component in m.components.values())
    if not (fp16 or args.engines):
        return
    spec = dynamic_profile(m)
    build = f"sdtrt build {folder}" + ("" if fp16 else " --precision fp32; no fp16 variants here")
    print(f"TensorRT default profile ({build}): {spec.describe()}")
    for name in m.components:
        dims = ", ".join(f"{dim} {lo}/{opt}/{hi}" for dim, (lo, opt, hi) in component_dims(m, name, spec).items())
        print(f"  {name}: min/opt/max {dims}")


def _mib(folder: Path, file: ComponentFile) -> str:
    """The size on disk of an export's file and its weights (.onnx.data; an IR's .bin), in MiB."""
    paths = {folder / file.path, *folder.glob(file.path + "*"), (folder / file.path).with_suffix(".bin")}
    return f"{sum(p.stat().st_size for p in paths if p.is_file()) / 2**20:.1f} MiB"


def verify(args: argparse.Namespace) -> int | None:
    from sdtrt.engine.verify import verify_export

    result = verify_export(args.folder)
    if result.ok:
        print(f"{args.folder}: ok ({result.files} files)")
        return None
    for problem in result.problems:
        print(f"sdtrt: error: {problem}", file=sys.stderr)
    return 2


def quantize(args: argparse.Namespace) -> None:
    from sdtrt.quantize import quantize, read_prompts

    prompts = None if args.prompts is None else read_prompts(args.prompts)
    options = {"steps": args.steps, "guidance": args.guidance, "height": args.height, "width": args.width}
    manifest = quantize(args.folder, prompts=prompts, overwrite=args.overwrite, **options)
    networks = [name for name, component in manifest.components.items() if component.openvino]
    ort = [name for name, component in manifest.components.items() if component.onnxruntime]
    print(
        f"quantized {', '.join(networks)} of {args.folder} to int8 (run it with --precision int8), and its "
        f"{', '.join(ort)} for ort-cpu (--backend ort-cpu --precision int8)"
    )


def build(args: argparse.Namespace) -> None:
    from sdtrt.engine.manifest import load_manifest
    from sdtrt.engine.profiles import parse_profile
    from sdtrt.engine.trt_build import build_engines

    profile = parse_profile(load_manifest(args.folder), args.static, args.dynamic, args.batch, not args.no_cfg)
    paths = build_engines(
        args.folder,
        profile,
        components=args.components,
        precision=args.precision,
        workspace_gib=args.workspace,
        force=args.force,
        progress=not args.quiet,
    )
    print(f"{len(paths)} TensorRT plans for {profile.describe()} in {paths[0].parent}")


def serve(args: argparse.Namespace) -> None:
    try:
        from sdtrt.serve.launch import serve
    except ModuleNotFoundError as exc:
        raise SdtrtError(f"{exc.name} is not installed; serving needs: pip install 'sdtrt[serve]'") from None
    serve(args)


def demo(args: argparse.Namespace) -> None:
    if args.map and args.grid:
        raise InvalidInputError("--map draws one picture; --grid draws the example prompts: choose one")
    run_demo(
        args.root, args.prompt, args.steps, args.guidance, args.seed, args.grid, args.quiet, args.map, args.tiny_vae
    )
