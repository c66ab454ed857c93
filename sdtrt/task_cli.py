"""The drawing commands of the CLI, one per registered task (runtime/tasks), made from the task records: the
input images as positionals, the task's options as flags with the record's defaults and help, then the options
every drawing command shares (steps and guidance default to the task's own)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdtrt.generate import Lora

if TYPE_CHECKING:
    from sdtrt.runtime.tasks import Task

# a drawing command's flags by the pipeline's names for them, where these differ
SHARED_FLAGS = {"negative_prompt": "negative", "num_inference_steps": "steps", "guidance_scale": "guidance"}
CONTROL_FLAGS = ("control", "control_start", "control_end", "guess_mode")
CLI_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float}


def add_task_command(command: Callable[..., argparse.ArgumentParser], task: Task, handler: Callable) -> None:
    """The subcommand of ``task`` (a runtime.tasks.Task); ``command`` makes a subcommand (sdtrt/cli.py)."""
    cmd = command(task.cli_name, handler, task.summary, "folder")
    for name in task.images:
        cmd.add_argument(name, type=Path, help=next(a.help for a in task.arguments if a.name == name))
    cmd.add_argument("prompt", type=str, help="what the picture should show")
    cmd.set_defaults(task=task.name)
    for argument in task.arguments:
        if argument.python_only or argument.kind == "image":
            continue
        flag = "--" + argument.name.replace("_", "-")
        text = f"{argument.help} (default: {argument.default_text()})"
        if argument.kind == "bool" and argument.default:
            cmd.add_argument(f"--no-{flag[2:]}", dest=argument.name, action="store_false", help=text)
        elif argument.kind == "bool":
            cmd.add_argument(flag, dest=argument.name, action="store_true", help=text)
        else:
            cmd.add_argument(flag, type=CLI_TYPES[argument.kind], default=argument.default, help=text)
    if task.sized:
        for side in ("height", "width"):
            cmd.add_argument(f"--{side}", type=int, default=None, help=f"pixels (default: {task.size_help})")
    _add_shared_options(cmd, task.steps, task.guidance)
    if task.controlnets:
        _add_control_options(cmd)


def task_options(task: Task, args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline method's options from a drawing command's arguments: the task's own (images included), the
    shared ones under the pipeline's names, and the ControlNet options (one error for window flags without one)."""
    from sdtrt.engine.errors import SdtrtError
    from sdtrt.runtime.request import REQUEST_OPTIONS

    own = [a.name for a in task.arguments if not a.python_only]
    shared = [name for name in REQUEST_OPTIONS if task.sized or name not in ("height", "width")]
    options = {name: getattr(args, name) for name in own}
    options |= {name: getattr(args, SHARED_FLAGS.get(name, name)) for name in shared}
    if getattr(args, "control", None):
        names, images, scales = (list(column) for column in zip(*args.control, strict=True))
        options |= {
            "controlnet": names,
            "control_image": images,
            "controlnet_conditioning_scale": scales,
            "control_guidance_start": args.control_start,
            "control_guidance_end": args.control_end,
            "guess_mode": args.guess_mode,
        }
    elif task.controlnets and (args.guess_mode or (args.control_start, args.control_end) != (0, 1)):
        raise SdtrtError("--control-start, --control-end and --guess-mode need a --control NAME=IMAGE")
    return options


def _add_shared_options(parser: argparse.ArgumentParser, steps: int, guidance: float) -> None:
    """The options of every drawing command; ``steps`` and ``guidance``: the task's defaults."""
    from sdtrt.engine.backends import BACKEND_NAMES
    from sdtrt.runtime.schedulers import SCHEDULERS

    parser.add_argument("-o", "--out", type=Path, default=Path("out.png"), help="PNG path (default: out.png)")
    parser.add_argument("--negative", default=None, help="negative prompt, used when guidance > 1 (default: none)")
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps})")
    parser.add_argument(
        "--guidance", type=float, default=guidance, help=f"classifier-free guidance scale (default: {guidance:g})"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), default=None, help="the sampler (default: the model's own)"
    )
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    parser.add_argument(
        "--tiny-vae",
        dest="vae",
        action="store_const",
        const="tiny",
        default="full",
        help="decode (and encode) with the export's tiny VAE from sdtrt add-tiny-vae (default: full)",
    )
    cache = parser.add_argument_group("step caching (DeepCache; sdtrt add-step-cache)")
    cache.add_argument(
        "--cache-interval", type=int, default=1, metavar="N", help="the whole UNet every N-th step, 1: off (default: 1)"
    )
    cache.add_argument(
        "--cache-branch", type=int, default=None, metavar="N", help="the skip branch (default: the export's graphs')"
    )
    cache.add_argument(
        "--cache-schedule",
        choices=("uniform", "nonuniform"),
        default="uniform",
        help="where the full steps fall (default: uniform)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default="auto",
        help="default: auto (trt, else ort-cuda, else openvino, else ort-cpu)",
    )
    parser.add_argument(
        "--precision",
        choices=("bf16", "fp32", "int8"),
        default=None,
        help="arithmetic precision where the backend offers a choice: openvino runs bf16 (default where the "
        "CPU has native bf16), fp32, or int8 once `sdtrt quantize --int8` made int8 networks; ort-cpu fp32 or int8 "
        "(its int8 UNet, from the same command)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        type=lora_option,
        default=[],
        metavar="PATH[:SCALE]",
        help="apply a LoRA adapter (.safetensors, diffusers or kohya keys) at SCALE (default 1); repeatable",
    )


def _add_control_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control",
        action="append",
        type=control_option,
        default=[],
        metavar="NAME=IMAGE[:SCALE]",
        help="condition on IMAGE through the attached ControlNet NAME at SCALE (default 1); repeatable",
    )
    parser.add_argument(
        "--control-start", type=float, default=0.0, help="ControlNets act from this fraction of steps (default: 0)"
    )
    parser.add_argument("--control-end", type=float, default=1.0, help="... up to this fraction (default: 1)")
    parser.add_argument("--guess-mode", action="store_true", help="ControlNets see the conditional half only")


def control_option(text: str) -> tuple[str, Path, float]:
    """NAME=IMAGE[:SCALE] -> (name, image, scale); a colon not followed by a number is part of the path."""
    name, _, image = text.partition("=")
    if not name or not image:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=IMAGE[:SCALE]")
    path, scale = lora_option(image)
    return name, path, scale


def lora_option(text: str) -> Lora:
    """PATH[:SCALE] -> (path, scale); a colon not followed by a number is part of the path."""
    path, _, scale = text.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0
