"""The sdtrt command line: argument parsing, logging and the one error line; each command's handler is in
sdtrt/commands.py (the demo's work in sdtrt/demo.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from sdtrt import commands
from sdtrt.demo import DEMO_GUIDANCE, DEMO_PROMPT, DEMO_ROOT, demo_maps
from sdtrt.engine.errors import SdtrtError
from sdtrt.task_cli import add_task_command

Handler = Callable[[argparse.Namespace], int | None]  # None: success; else the exit code
GLOBAL_FLAGS = ("quiet", "verbose", "debug")  # accepted before or after the command
EXPORT_MODULES = {"torch", "diffusers", "transformers", "onnx", "onnx_graphsurgeon", "accelerate", "safetensors"}
POSITIONAL_HELP = {
    "model": "a local diffusers folder, a single-file checkpoint (.safetensors) or a hub id such as org/name",
    "folder": "an artifact folder written by `sdtrt export`",
}
ALLOW_PICKLE_HELP = (
    "also read legacy pickled weights (.ckpt/.pt/.pth/.bin files, a folder's .bin without .safetensors). RISK: "
    "unpickling can run arbitrary code hidden in the file; torch's weights-only unpickler limits it to tensors but "
    "is no sandbox. Use only files you trust; better, convert them to .safetensors"
)


def _parser() -> argparse.ArgumentParser:
    from sdtrt.engine.manifest import PRECISIONS
    from sdtrt.engine.network_facts import COMPONENTS, EXPORTED

    common = argparse.ArgumentParser(add_help=False)  # SUPPRESS: -q/-v/--debug count before or after the command
    for flags, text in (
        (("-q", "--quiet"), "only warnings and errors"),
        (("-v", "--verbose"), "debug logging"),
        (("--debug",), "on an error, also print its traceback (with the exceptions that caused it)"),
    ):
        common.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, help=text)
    parser = argparse.ArgumentParser(
        prog="sdtrt",
        parents=[common],
        description="Stable Diffusion inference: export a diffusers model to ONNX, then generate images "
        "with a lean NumPy runtime on OpenVINO or ONNX Runtime (CPU), ONNX Runtime CUDA or TensorRT.",
        epilog='Start with `sdtrt demo`, then `sdtrt export MODEL --out DIR` and `sdtrt generate DIR "prompt"`. '
        "`sdtrt COMMAND --help` describes a command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Handler, summary: str, *positionals: str, more: str = "") -> argparse.ArgumentParser:
        """A subcommand that runs ``func``; ``more``: what its --help says beyond ``summary``."""
        about = f"{summary[0].upper()}{summary[1:]}. {more}".strip()
        cmd = sub.add_parser(name, help=summary, description=about, parents=[common])
        cmd.set_defaults(func=func)
        for arg in positionals:
            cmd.add_argument(arg, type=str if arg == "model" else Path, help=POSITIONAL_HELP[arg])
        return cmd

    summary = "export a diffusers model or a checkpoint to ONNX + manifest.json"
    more = "The drawing commands, info and build read the artifact folder it writes."
    export = command("export", commands.export, summary, "model", more=more)
    export.add_argument("--out", required=True, type=Path, help="the artifact folder to write")
    export.add_argument(
        "--precision", nargs="+", choices=PRECISIONS, default=["fp32"], help="ONNX variants (default: fp32)"
    )
    export.add_argument(
        "--components",
        nargs="+",
        choices=EXPORTED,  # the attached networks come with their own commands (add-controlnet, add-tiny-vae)
        default=None,
        help="networks (default: all the model uses)",
    )
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    export.add_argument("--step-cache", action="store_true", help="also the step-cache graphs (add-step-cache)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing artifact folder")
    export.add_argument(
        "--ort-fused",
        action="store_true",
        help="also write ONNX Runtime's fused graphs of the UNet and VAE (fused attention, GroupNorm, ...): "
        "fp16 ones for ort-cuda with --precision fp16, the UNet's fp32 one for ort-cpu with fp32",
    )
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
    export.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)

    from sdtrt.runtime.tasks import TASKS

    for task in TASKS.values():  # generate (txt2img), img2img, inpaint, outpaint, upscale, ...: runtime/tasks
        add_task_command(command, task, commands.run_task)

    summary = "attach a ControlNet to an export"
    more = (
        "The first one also exports the UNet that takes ControlNet residuals, from the base model (the one the "
        "manifest names, or --base). Then: sdtrt generate FOLDER PROMPT --control NAME=IMAGE."
    )
    attach = command("add-controlnet", commands.add_controlnet, summary, "folder", more=more)
    attach.add_argument("controlnet", help="a diffusers ControlNet folder, a hub id, or one .safetensors file")
    attach.add_argument("--name", default=None, help="what --control calls it (default: its folder or file name)")
    attach.add_argument("--base", default=None, help="the model FOLDER was exported from (default: as recorded)")
    attach.add_argument("--overwrite", action="store_true", help="replace a ControlNet attached under this name")
    attach.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)

    summary = "attach a tiny VAE (a diffusers AutoencoderTiny: TAESD for SD 1.x/2.x, TAESDXL for SDXL) to an export"
    more = "Then: sdtrt generate FOLDER PROMPT --tiny-vae (a ~10x faster decode)."
    tiny_vae = command("add-tiny-vae", commands.add_tiny_vae, summary, "folder", more=more)
    tiny_vae.add_argument("tiny_vae", metavar="TINY_VAE", help="a diffusers AutoencoderTiny folder (.safetensors)")
    tiny_vae.add_argument("--overwrite", action="store_true", help="replace the tiny VAE attached before")

    summary = "attach the step-cache graphs (DeepCache: a UNet that returns its deep feature, a shallow UNet)"
    more = "Then: sdtrt generate FOLDER PROMPT --cache-interval 3. Reads the UNet's weights file, adds no copy."
    step_cache = command("add-step-cache", commands.add_step_cache, summary, "folder", more=more)
    step_cache.add_argument("--branch", type=int, default=0, help="DeepCache's skip branch (default 0)")
    step_cache.add_argument("--base", default=None, help="the model FOLDER was exported from (default: as recorded)")
    step_cache.add_argument("--overwrite", action="store_true", help="replace the step-cache graphs attached before")

    more = "With fp16 variants (or --engines) also the TensorRT profile that `sdtrt build` builds by default."
    info = command("info", commands.info, "describe an artifact folder: model, files and sizes", "folder", more=more)
    info.add_argument("--engines", action="store_true", help="also print the default TensorRT profile")

    summary = "check an artifact folder's files against the sizes and sha256 its manifest records"
    more = "Reads every file in full; prints FOLDER: ok, or one line per problem and exits 2."
    command("verify", commands.verify, summary, "folder", more=more)

    summary = "quantize an export's UNet and text encoders to int8 for openvino (NNCF), its UNet for ort-cpu (ORT)"
    more = (
        "Calibrates on the runtime's own drawings of --prompts; then: sdtrt generate FOLDER PROMPT --precision int8 "
        "(openvino; add --backend ort-cpu for ONNX Runtime's int8 UNet)."
    )
    quantize = command("quantize", commands.quantize, summary, "folder", more=more)
    quantize.add_argument(
        "--int8", action="store_true", required=True, help="int8 weights, int8 activations where safe"
    )
    quantize.add_argument("--prompts", type=Path, metavar="FILE", help="calibration prompts, one a line (default: 8)")
    quantize.add_argument("--steps", type=int, default=20, help="denoising steps per prompt (default: 20)")
    quantize.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: 7.5)")
    for side in ("height", "width"):
        quantize.add_argument(f"--{side}", type=int, default=None, help="pixels (default: the model's native size)")
    quantize.add_argument("--overwrite", action="store_true", help="quantize an export quantized already again")

    summary = "build TensorRT engines for an artifact folder (NVIDIA GPU + tensorrt)"
    build = command(
        "build", commands.build, summary, "folder", more="`--backend trt` then finds the plans in the folder."
    )
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

    summary = "export the embedded demo model (a tiny SD 1.x trained on coloured shapes), draw on the CPU"
    demo = command("demo", commands.demo, summary, more="Writes ROOT/demo.png; needs no download and no GPU.")
    demo.add_argument("--root", type=Path, default=DEMO_ROOT, help="the demo's folder (default: artifacts)")
    demo.add_argument(
        "--prompt", help=f'what to draw (default: "{DEMO_PROMPT}"; with an example --map, its own: colours and kind)'
    )
    demo.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    demo.add_argument(
        "--guidance", type=float, default=DEMO_GUIDANCE, help=f"guidance scale (default: {DEMO_GUIDANCE})"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--grid", action="store_true", help="draw a labelled grid of example prompts: demo-grid.png")
    demo.add_argument(
        "--map",
        metavar="MAP",
        help="draw where a semantic map says, with the demo's tiny ControlNet: a PNG the picture's size, black, the "
        "shape's region red for a circle, green for a square, blue for a triangle (--prompt names the colours); "
        f"or an example's name ({', '.join(demo_maps())}), or 'examples' for a grid of them all: demo-map.png",
    )
    demo.add_argument(
        "--tiny-vae",
        action="store_true",
        help="decode with the demo's tiny VAE (an AutoencoderTiny distilled from its own; attached to the export once)",
    )
    _add_serve_command(command)
    return parser


def _add_serve_command(command: Callable[..., argparse.ArgumentParser]) -> None:
    """`sdtrt serve`: its options, in groups (the defaults are sdtrt.serve.config's)."""
    from sdtrt.engine.backends import BACKEND_NAMES

    summary = "serve artifact folders over HTTP: native, OpenAI- and Automatic1111-compatible APIs"
    more = (
        "Each model is named by its folder's name. Needs `pip install 'sdtrt[serve]'`. An API key (Authorization: "
        "Bearer KEY on every route but /healthz and /readyz) is read from the SDTRT_API_KEY environment variable."
    )
    serve = command("serve", commands.serve, summary, more=more)
    serve.add_argument("folders", nargs="+", type=Path, metavar="ARTIFACTS", help=POSITIONAL_HELP["folder"])
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    serve.add_argument("--backend", choices=BACKEND_NAMES, default="auto", help="default: auto")
    serve.add_argument(
        "--precision",
        choices=("bf16", "fp32", "int8"),
        default=None,
        help="openvino: bf16, fp32, int8; ort-cpu: fp32, int8",
    )
    serve.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="MODEL=PATH",
        help="a LoRA adapter for MODEL that requests ask for by its file's name (loaded at scale 0); repeatable",
    )
    queue = serve.add_argument_group("queue and batching")
    queue.add_argument(
        "--queue-size", type=int, metavar="N", default=64, help="waiting requests per model before 429 (default 64)"
    )
    queue.add_argument(
        "--max-batch", type=int, metavar="N", default=4, help="images per UNet batch; 1: no batching (default 4)"
    )
    queue.add_argument(
        "--deadline", type=float, metavar="N", default=300.0, help="seconds a request may take in all (default 300)"
    )
    limits = serve.add_argument_group("limits per request")
    limits.add_argument(
        "--max-side", type=int, metavar="N", default=None, help="pixels per side (default: twice the native side)"
    )
    limits.add_argument("--max-steps", type=int, metavar="N", default=150, help="denoising steps (default 150)")
    limits.add_argument("--max-images", type=int, metavar="N", default=8, help="images per request (default 8)")
    limits.add_argument(
        "--max-prompt-chars", type=int, metavar="N", default=2000, help="characters per prompt (default 2000)"
    )
    limits.add_argument("--max-body-mb", type=float, metavar="N", default=16.0, help="request body in MiB (default 16)")
    ray = serve.add_argument_group("Ray Serve")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (needs ray[serve])")
    ray.add_argument(
        "--replicas", type=int, metavar="N", default=1, help="replicas, each with its own pipelines (default 1)"
    )
    ray.add_argument("--replica-cpus", type=float, metavar="N", default=1.0, help="CPUs per replica (default 1)")
    ray.add_argument(
        "--replica-gpus", type=float, metavar="N", default=0.0, help="GPUs per replica (default 0; 1 on a GPU node)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for flag in GLOBAL_FLAGS:  # absent when given neither before nor after the command
        vars(args).setdefault(flag, False)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("sdtrt").setLevel(level)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("sdtrt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code, message = _error_line(exc)
        print(f"sdtrt: error: {message}", file=sys.stderr)
        if args.debug:  # the chain too: an ExportError raised from torch's exception shows both
            traceback.print_exception(exc)
        return code


def _error_line(exc: Exception) -> tuple[int, str]:
    """The exit code and the one line a user sees for ``exc``: 2 for what the user can fix, 1 for a bug."""
    if isinstance(exc, (SdtrtError, OSError)):  # OSError: a file that cannot be read or written
        code, message = 2, str(exc)
    elif isinstance(exc, ModuleNotFoundError) and exc.name in EXPORT_MODULES:
        code, message = 2, f"{exc.name} is not installed; exporting needs: pip install 'sdtrt[export]'"
    else:
        code, message = 1, f"unexpected {type(exc).__name__}: {exc} (a bug in sdtrt: run with --debug for details)"
    return code, " ".join(message.splitlines())
