"""The sdtrt command line: export, generate / img2img / inpaint / outpaint / upscale, info, build, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sdtrt.engine.errors import ManifestError, SdtrtError

log = logging.getLogger("sdtrt")

DEMO_ROOT = Path("artifacts")
# The embedded demo model knows one coloured shape on a coloured background (see train/shapes.py).
DEMO_PROMPT = "a yellow circle on a blue background, top left"
DEMO_GUIDANCE = 5.0
DEMO_GRID_PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a black background, top left",
    "a small green triangle on a white background, bottom right",
    "a large blue circle on a yellow background, top right",
    "a white square on a red background, center",
    "a black triangle on a green background",
    "a small red triangle on a yellow background, top right",
    "a large white circle on a black background, bottom left",
)
EXPORT_MODULES = {"torch", "diffusers", "transformers", "onnx", "onnx_graphsurgeon", "accelerate", "safetensors"}


def _parser() -> argparse.ArgumentParser:
    from sdtrt.engine.backends import BACKENDS
    from sdtrt.engine.manifest import COMPONENTS, PRECISIONS
    from sdtrt.runtime.schedulers import SCHEDULERS

    parser = argparse.ArgumentParser(
        prog="sdtrt",
        description="Stable Diffusion inference: export a diffusers model to ONNX, then generate images "
        "with a lean NumPy runtime on ONNX Runtime (CPU or CUDA) or TensorRT.",
        epilog='Start with `sdtrt demo`, then `sdtrt export MODEL --out DIR` and `sdtrt generate DIR "prompt"`.',
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = sub.add_parser("export", help="export a diffusers model or a checkpoint to ONNX + manifest.json")
    export.add_argument(
        "model",
        help="a local diffusers folder, a single-file checkpoint (.safetensors) or a hub id such as org/name",
    )
    export.add_argument("--out", required=True, type=Path, help="the artifact folder to write")
    export.add_argument(
        "--precision", nargs="+", choices=PRECISIONS, default=["fp32"], help="ONNX variants (default: fp32)"
    )
    export.add_argument(
        "--components", nargs="+", choices=COMPONENTS, default=None, help="networks (default: all the model uses)"
    )
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing artifact folder")
    export.add_argument(
        "--config",
        type=Path,
        metavar="DIR",
        help="checkpoints: a diffusers folder whose configs describe the architecture (default: bundled "
        "SD 1.5 / 2.x / XL configs, chosen from the checkpoint's keys)",
    )
    export.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction"),
        help="checkpoints: what the UNet predicts (default: what the checkpoint says; SD 2.x: v_prediction)",
    )
    export.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read legacy pickled checkpoints (.ckpt/.pt/.pth/.bin). RISK: unpickling can run arbitrary "
        "code hidden in the file; torch's weights-only unpickler limits it to tensors but is no sandbox. Use only "
        "files you trust; better, convert them to .safetensors",
    )

    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("folder", type=Path, help="an artifact folder written by `sdtrt export`")
    gen.add_argument("prompt", help="what to draw")
    _add_size_options(gen)
    _add_generation_options(gen, BACKENDS, SCHEDULERS, steps=30)

    img2img = sub.add_parser("img2img", help="transform an image by a prompt")
    img2img.add_argument("folder", type=Path, help="an artifact folder written by `sdtrt export`")
    img2img.add_argument("image", type=Path, help="the RGB image to start from")
    img2img.add_argument("prompt")
    img2img.add_argument("--strength", type=float, default=0.8, help="0 keeps the image, 1 ignores it (default 0.8)")
    _add_size_options(img2img, "the image's own size, rounded down")
    _add_generation_options(img2img, BACKENDS, SCHEDULERS, steps=50)

    inpaint = sub.add_parser("inpaint", help="repaint the white part of a mask")
    inpaint.add_argument("folder", type=Path, help="an artifact folder written by `sdtrt export`")
    inpaint.add_argument("image", type=Path, help="the RGB image")
    inpaint.add_argument("mask", type=Path, help="a mask of the same size: white = repaint")
    inpaint.add_argument("prompt")
    inpaint.add_argument("--strength", type=float, default=1.0, help="how far to noise the masked part (default 1)")
    inpaint.add_argument("--mask-blur", type=float, default=0.0, help="feather the paste-back by this many pixels")
    _add_size_options(inpaint, "the image's own size, rounded down")
    _add_generation_options(inpaint, BACKENDS, SCHEDULERS, steps=50)

    outpaint = sub.add_parser("outpaint", help="extend an image beyond its borders")
    outpaint.add_argument("folder", type=Path, help="an artifact folder written by `sdtrt export`")
    outpaint.add_argument("image", type=Path, help="the RGB image")
    outpaint.add_argument("prompt")
    for side in ("left", "right", "top", "bottom"):
        outpaint.add_argument(f"--{side}", type=int, default=0, help=f"pixels to add on the {side}")
    outpaint.add_argument("--overlap", type=int, default=16, help="pixels of the old image repainted at the seam")
    outpaint.add_argument("--mask-blur", type=float, default=8.0, help="seam feathering in pixels (default 8)")
    _add_generation_options(outpaint, BACKENDS, SCHEDULERS, steps=50)

    upscale = sub.add_parser("upscale", help="4x super-resolution with an x4-upscaler export")
    upscale.add_argument("folder", type=Path, help="an artifact folder written by `sdtrt export`")
    upscale.add_argument("image", type=Path, help="the low-resolution RGB image")
    upscale.add_argument("prompt")
    upscale.add_argument("--noise-level", type=int, default=20, help="noise added to the input (default 20)")
    upscale.add_argument("--tile-size", type=int, default=None, help="input pixels per tile (default: native)")
    upscale.add_argument("--tile-overlap", type=int, default=None, help="input pixels tiles overlap (default 16)")
    upscale.add_argument("--no-tiling", action="store_true", help="refuse inputs larger than one tile")
    _add_generation_options(upscale, BACKENDS, SCHEDULERS, steps=75, guidance=9.0)

    info = sub.add_parser("info", help="describe an artifact folder")
    info.add_argument("folder", type=Path, help="an artifact folder written by `sdtrt export`")

    build = sub.add_parser("build", help="build TensorRT engines for an artifact folder (NVIDIA GPU + tensorrt)")
    build.add_argument("folder", type=Path, help="an artifact folder written by `sdtrt export`")
    shape = build.add_mutually_exclusive_group()
    shape.add_argument("--static", metavar="HxW", help="one image size, the fastest engines (e.g. 512x512)")
    shape.add_argument(
        "--dynamic", metavar="MIN-MAX", help="a range of image sides in pixels (default: half to twice native)"
    )
    build.add_argument("--batch", metavar="N|MIN-MAX", help="images per request (default: 1 static, 1-4 dynamic)")
    build.add_argument("--no-cfg", action="store_true", help="for guidance <= 1 only: the UNet batch is not doubled")
    build.add_argument("--components", nargs="+", choices=COMPONENTS, help="networks (default: all in the folder)")
    build.add_argument("--precision", choices=PRECISIONS, default="fp16", help="ONNX variant to build (default: fp16)")
    build.add_argument("--workspace", type=float, metavar="GIB", help="cap the builder's scratch GPU memory")
    build.add_argument("--force", action="store_true", help="rebuild plans that are already cached")

    demo = sub.add_parser(
        "demo", help="export the embedded demo model (a tiny SD 1.x trained on coloured shapes), draw on the CPU"
    )
    demo.add_argument("--root", type=Path, default=DEMO_ROOT, help="the demo's folder (default: artifacts)")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help=f'what to draw (default: "{DEMO_PROMPT}")')
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--guidance", type=float, default=DEMO_GUIDANCE)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--grid", action="store_true", help="draw a labelled grid of example prompts: demo-grid.png")
    return parser


def _add_size_options(parser: argparse.ArgumentParser, default: str = "the model's native size") -> None:
    parser.add_argument("--height", type=int, default=None, help=f"pixels (default: {default})")
    parser.add_argument("--width", type=int, default=None, help=f"pixels (default: {default})")


def _add_generation_options(
    parser: argparse.ArgumentParser,
    backends: Sequence[str],
    schedulers: Sequence[str],
    steps: int,
    guidance: float = 7.5,
) -> None:
    parser.add_argument("-o", "--out", type=Path, default=Path("out.png"), help="PNG path (default: out.png)")
    parser.add_argument("--negative", default=None, help="negative prompt (used when guidance > 1)")
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps})")
    parser.add_argument(
        "--guidance", type=float, default=guidance, help=f"classifier-free guidance scale (default: {guidance})"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--scheduler", choices=sorted(schedulers), default=None, help="default: the model's own")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    parser.add_argument(
        "--backend", choices=backends, default="auto", help="default: auto (trt, else ort-cuda, else ort-cpu)"
    )
    parser.add_argument(
        "--lora",
        action="append",
        type=_lora_option,
        default=[],
        metavar="PATH[:SCALE]",
        help="apply a LoRA adapter (.safetensors, diffusers or kohya keys) at SCALE (default 1); repeatable",
    )


def _lora_option(text: str) -> tuple[Path, float]:
    """PATH[:SCALE] -> (path, scale); a colon not followed by a number is part of the path."""
    path, _, scale = text.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


# The pipeline method behind each generating command, and its options beyond the common ones.
TASKS = {
    "generate": ("txt2img", ("height", "width")),
    "img2img": ("img2img", ("image", "strength", "height", "width")),
    "inpaint": ("inpaint", ("image", "mask", "strength", "mask_blur", "height", "width")),
    "outpaint": ("outpaint", ("image", "left", "right", "top", "bottom", "overlap", "mask_blur")),
    "upscale": ("upscale", ("image", "noise_level", "tile_size", "tile_overlap")),
}


def _task_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of the pipeline method for a generating command."""
    _, extra = TASKS[args.command]
    options = {name: getattr(args, name) for name in extra}
    if args.command == "upscale":
        options["tiling"] = not args.no_tiling
    return {
        "negative_prompt": args.negative,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "num_images": args.num_images,
        **options,
    }


def _image_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def _save_png(image, path: Path) -> None:
    from sdtrt.engine.fsutil import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _generate(
    task: str,
    folder: Path,
    prompt: str,
    out: Path,
    quiet: bool,
    backend: str,
    loras: Sequence[tuple[Path, float]] = (),
    **options,
) -> None:
    """Run pipeline method ``task`` with a progress bar, write the PNGs, print seed and stage timings.

    ``loras``: (path, scale) of the LoRA adapters to apply first.
    """
    from tqdm.auto import tqdm

    from sdtrt.runtime.pipeline import Pipeline

    steps = options["num_inference_steps"]
    with (
        Pipeline.load(folder, backend=backend) as pipe,
        tqdm(total=steps, desc="denoise", unit="step", disable=quiet) as bar,
    ):
        for path, scale in loras:
            pipe.load_lora(path, name=str(path), scale=scale)

        def advance(done: int, total: int) -> None:
            bar.total = total  # a scheduler may take more UNet steps than asked (PNDM: one more)
            bar.update(done - bar.n)

        result = getattr(pipe, task)(prompt, progress=advance, **options)
    paths = _image_paths(out, len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        _save_png(image, path)
    print(f"wrote {', '.join(map(str, paths))} (seed {result.seed}, {result.scheduler}, backend {result.backend})")
    print("  ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in result.timings.items()))


def _info(folder: Path) -> None:
    from sdtrt.engine.manifest import load_manifest

    m = load_manifest(folder)
    print(
        f"{folder}: {m.family}, {m.prediction_type}, native {m.default_width}x{m.default_height}, "
        f"sizes in multiples of {m.size_multiple}"
    )
    print(f"source: {m.source.get('path')} (sha256 {m.source.get('sha256', '')[:12]})")
    tokenizers = ", ".join(f"{tok}/" for tok in m.tokenizers.values())
    print(f"scheduler: {m.scheduler.get('_class_name')}   tokenizers: {tokenizers} ({m.text_max_length} tokens)")
    for name, component in m.components.items():
        files = ", ".join(
            f"{p}: {f.path} ({sum(x.stat().st_size for x in folder.glob(f.path + '*')) / 2**20:.1f} MiB)"
            for p, f in component.files.items()
        )
        profile = ", ".join(f"{dim} {lo}/{opt}/{hi}" for dim, (lo, opt, hi) in component.profile.items())
        print(f"  {name}: {files}; profile min/opt/max {profile}")


def _build(args: argparse.Namespace) -> None:
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


def demo_model_dir() -> Path:
    """The embedded demo model: a diffusers folder shipped in the package (trained by train/tiny.py)."""
    import sdtrt.export

    return Path(sdtrt.export.__file__).parent / "assets" / "tiny-sd"


def _demo(root: Path, prompt: str, steps: int, guidance: float, seed: int, grid: bool, quiet: bool) -> None:
    from sdtrt.engine.manifest import load_manifest
    from sdtrt.export.exporter import export_model, source_hash

    model, export_dir = demo_model_dir(), root / "tiny-sd-onnx"
    try:  # none, another format_version, or from another model: stale
        current = load_manifest(export_dir).source.get("sha256") == source_hash(model)
    except ManifestError as exc:
        log.debug("re-exporting the demo model: %s", exc)
        current = False
    if not current:
        log.info("exporting the embedded demo model to %s", export_dir)
        export_model(model, export_dir, overwrite=True, progress=not quiet)
    if grid:
        _demo_grid(export_dir, root / "demo-grid.png", steps, guidance, seed, quiet)
        return
    _generate(
        "txt2img",
        export_dir,
        prompt,
        root / "demo.png",
        quiet,
        backend="ort-cpu",
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
    )


def _demo_grid(folder: Path, out: Path, steps: int, guidance: float, seed: int, quiet: bool) -> None:
    """Draw DEMO_GRID_PROMPTS with one seed into one PNG: each picture enlarged 3x, its prompt below it."""
    import textwrap

    from PIL import Image, ImageDraw
    from tqdm.auto import tqdm

    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        images = [
            pipe.txt2img(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed).images[0]
            for prompt in tqdm(DEMO_GRID_PROMPTS, desc="grid", unit="image", disable=quiet)
        ]
    columns, side, label = 4, 3 * images[0].width, 30  # label: pixels for two lines of the default font
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * side, rows * (side + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (prompt, image) in enumerate(zip(DEMO_GRID_PROMPTS, images, strict=True)):
        x, y = i % columns * side, i // columns * (side + label)
        sheet.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        draw.multiline_text((x + 4, y + side + 2), textwrap.fill(prompt, side // 6), fill="black", spacing=1)
    _save_png(sheet, out)
    print(f"wrote {out} ({len(images)} prompts, seed {seed}, {steps} steps, guidance {guidance})")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("sdtrt").setLevel(level)
    try:
        if args.command == "export":
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
            )
            print(f"exported {args.model} to {args.out}")
        elif args.command in TASKS:
            task = TASKS[args.command][0]
            options = _task_options(args)
            _generate(task, args.folder, args.prompt, args.out, args.quiet, args.backend, args.lora, **options)
        elif args.command == "info":
            _info(args.folder)
        elif args.command == "build":
            _build(args)
        elif args.command == "demo":
            _demo(args.root, args.prompt, args.steps, args.guidance, args.seed, args.grid, args.quiet)
    except SdtrtError as exc:
        print(f"sdtrt: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output path that cannot be written: a folder, under a file, no permission
        print(f"sdtrt: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in EXPORT_MODULES:
            raise
        print(
            f"sdtrt: error: {exc.name} is not installed; exporting needs: pip install 'sdtrt[export]'", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("sdtrt: interrupted", file=sys.stderr)
        return 130
    return 0
