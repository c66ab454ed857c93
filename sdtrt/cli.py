"""The sdtrt command line: export, generate, info, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sdtrt.engine.errors import SdtrtError

log = logging.getLogger("sdtrt")

DEMO_ROOT = Path("artifacts")
DEMO_PROMPT = "a red circle on a blue background"
EXPORT_MODULES = {"torch", "diffusers", "transformers", "onnx", "onnx_graphsurgeon", "accelerate", "safetensors"}


def _parser() -> argparse.ArgumentParser:
    from sdtrt.engine.backends import BACKENDS
    from sdtrt.engine.manifest import COMPONENTS, PRECISIONS
    from sdtrt.runtime.schedulers import SCHEDULERS

    parser = argparse.ArgumentParser(
        prog="sdtrt",
        description="Stable Diffusion inference: export a diffusers model to ONNX, then generate images "
        "with a lean NumPy runtime on ONNX Runtime (CPU).",
        epilog='Start with `sdtrt demo`, then `sdtrt export MODEL --out DIR` and `sdtrt generate DIR "prompt"`.',
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = sub.add_parser("export", help="export a diffusers model folder to ONNX + manifest.json")
    export.add_argument("model", help="a local diffusers folder (or a hub id such as org/name, with network)")
    export.add_argument("--out", required=True, type=Path, help="the artifact folder to write")
    export.add_argument(
        "--precision", nargs="+", choices=PRECISIONS, default=["fp32"], help="ONNX variants (default: fp32)"
    )
    export.add_argument(
        "--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS), help="networks (default: all)"
    )
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing artifact folder")

    gen = sub.add_parser("generate", help="text to image from an artifact folder")
    gen.add_argument("folder", type=Path, help="an artifact folder written by `sdtrt export`")
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument("-o", "--out", type=Path, default=Path("out.png"), help="PNG path (default: out.png)")
    _add_generation_options(gen, BACKENDS, SCHEDULERS)

    info = sub.add_parser("info", help="describe an artifact folder")
    info.add_argument("folder", type=Path)

    demo = sub.add_parser("demo", help="build the tiny embedded model, export it and draw one image on the CPU")
    demo.add_argument("--root", type=Path, default=DEMO_ROOT, help="the demo's folder (default: artifacts)")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _add_generation_options(
    parser: argparse.ArgumentParser, backends: Sequence[str], schedulers: Sequence[str]
) -> None:
    parser.add_argument("--negative", default=None, help="negative prompt (used when guidance > 1)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument("--scheduler", choices=sorted(schedulers), default=None, help="default: the model's own")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--num-images", type=int, default=1, help="images to draw (default: 1)")
    parser.add_argument("--backend", choices=backends, default="auto", help="default: auto")


def _image_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def _save_png(image, path: Path) -> None:
    from sdtrt.engine.fsutil import atomic_path

    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _generate(folder: Path, prompt: str, out: Path, quiet: bool, **options) -> None:
    from tqdm.auto import tqdm

    from sdtrt.runtime.pipeline import Pipeline

    with Pipeline.load(folder, backend=options.pop("backend")) as pipe:
        with tqdm(total=options["num_inference_steps"], desc="denoise", unit="step", disable=quiet) as bar:

            def advance(done: int, total: int) -> None:
                bar.total = total  # a scheduler may take more UNet steps than asked (PNDM: one more)
                bar.update(done - bar.n)

            result = pipe.txt2img(prompt, progress=advance, **options)
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
    print(f"scheduler: {m.scheduler.get('_class_name')}   tokenizer: {m.tokenizer}/ ({m.text_max_length} tokens)")
    for name, component in m.components.items():
        files = ", ".join(
            f"{p}: {f.path} ({sum(x.stat().st_size for x in folder.glob(f.path + '*')) / 2**20:.1f} MiB)"
            for p, f in component.files.items()
        )
        profile = ", ".join(f"{dim} {lo}/{opt}/{hi}" for dim, (lo, opt, hi) in component.profile.items())
        print(f"  {name}: {files}; profile min/opt/max {profile}")


def _demo(root: Path, prompt: str, steps: int, seed: int, quiet: bool) -> None:
    model_dir, export_dir = root / "tiny-sd1", root / "tiny-sd1-onnx"
    if not (export_dir / "manifest.json").is_file():
        from sdtrt.export.exporter import export_model
        from sdtrt.export.tiny import build_tiny_sd1

        if not (model_dir / "model_index.json").is_file():
            log.info("building the tiny embedded model in %s", model_dir)
            build_tiny_sd1(model_dir, overwrite=True)
        log.info("exporting it to %s", export_dir)
        export_model(model_dir, export_dir, overwrite=True, progress=not quiet)
    _generate(
        export_dir,
        prompt,
        root / "demo.png",
        quiet,
        backend="ort-cpu",
        negative_prompt=None,
        num_inference_steps=steps,
        guidance_scale=7.5,
        seed=seed,
        scheduler=None,
        height=None,
        width=None,
        num_images=1,
    )


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
            )
            print(f"exported {args.model} to {args.out}")
        elif args.command == "generate":
            _generate(
                args.folder,
                args.prompt,
                args.out,
                args.quiet,
                backend=args.backend,
                negative_prompt=args.negative,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                seed=args.seed,
                scheduler=args.scheduler,
                height=args.height,
                width=args.width,
                num_images=args.num_images,
            )
        elif args.command == "info":
            _info(args.folder)
        elif args.command == "demo":
            _demo(args.root, args.prompt, args.steps, args.seed, args.quiet)
    except SdtrtError as exc:
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
