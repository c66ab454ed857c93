"""How often the demo model draws what it is asked: ``python -m train.evaluate EXPORT_DIR [--count N]``.

Random captions of the shapes data set (seeded), one picture each through the NumPy runtime. A
picture is read back by pixel statistics (train.shapes): its shape colour and background
(dominant_colours), its shape's kind (shape_kind) and place (shape_position). Every caption names
the colours and the kind; the place is scored on the captions that name one (about half).

``python -m train.evaluate --sensitivity FOLDER`` measures, through diffusers, how much the first denoising step's
UNet output moves when a prompt's place words change and when its colour words change (word_sensitivity): a
model that ignores the place words moves by almost nothing.

``python -m train.evaluate --controlnet FOLDER [--base FOLDER]`` scores the tiny ControlNet instead
(map_accuracy): seeded semantic maps with prompts naming the kind and the colours, drawn through
diffusers' StableDiffusionControlNetPipeline (train.controlnet.diffusers_drawer);
``python -m train.evaluate EXPORT_DIR --attached NAME`` draws them through the NumPy runtime with the
ControlNet attached to the export as NAME (``sdtrt add-controlnet``). A picture counts when
its shape's centroid lies within 6 px of the map's, its region covers the map's (IoU >= 0.6) and its
colours are the asked ones.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.demo import DEMO_GUIDANCE
from sdtrt.runtime.pipeline import Pipeline
from train import shapes

SCORES = ("shape_colour", "background", "colours", "kind", "position")
MAP_SCORES = ("centroid", "iou", "colours", "all")
MAX_CENTROID_DISTANCE = 6.0  # pixels
MIN_IOU = 0.6


@dataclass(frozen=True)
class MapCase:
    scene: shapes.Scene
    map: np.ndarray  # (64, 64, 3) uint8, shapes.semantic_map(scene)
    prompt: str  # the scene's colours and kind, no size or place: those come from the map
    seed: int


def map_cases(count: int, seed: int = 7) -> list[MapCase]:
    """``count`` seeded semantic maps (shapes anywhere in the middle half of the image) with their prompts."""
    rng = np.random.default_rng(seed)
    scenes = [shapes.sample_free_scene(rng) for _ in range(count)]
    return [
        MapCase(s, shapes.semantic_map(s), s.caption(with_size=False, with_position=False), i)
        for i, s in enumerate(scenes)
    ]


def map_accuracy(draw: Callable[[np.ndarray, str, int], np.ndarray], cases: Sequence[MapCase]) -> dict[str, float]:
    """Shares of ``cases`` where ``draw(map, prompt, seed)`` -> (H, W, 3) uint8 follows the map and the prompt.

    "centroid": the drawn shape's centroid within MAX_CENTROID_DISTANCE of the map region's; "iou": its
    region covers the map's with IoU >= MIN_IOU; "colours": the asked shape colour and background; "all": all three.
    """
    hits = dict.fromkeys(MAP_SCORES, 0)
    for case in cases:
        image = draw(case.map, case.prompt, case.seed)
        region = shapes.shape_region(image)
        _, wanted = shapes.read_map(case.map)
        centroid, target = shapes.shape_centroid(image), _centre(wanted)
        near = centroid is not None and math.dist(centroid, target) <= MAX_CENTROID_DISTANCE
        covers = (region & wanted).sum() / max(1, (region | wanted).sum()) >= MIN_IOU
        colours = shapes.dominant_colours(image) == (case.scene.colour, case.scene.background)
        for name, hit in zip(MAP_SCORES, (near, covers, colours, near and covers and colours), strict=True):
            hits[name] += bool(hit)
    return {name: hits[name] / len(cases) for name in MAP_SCORES}


def map_accuracy_on_runtime(
    export: Path,
    name: str,
    count: int,
    backend: str = "ort-cpu",
    steps: int = 20,
    guidance: float = DEMO_GUIDANCE,
    precision: str | None = None,
) -> dict[str, float]:
    """map_accuracy of ``count`` map_cases through the runtime, the ControlNet attached to ``export`` as ``name``
    (``precision``: the backend's arithmetic, e.g. openvino's "int8")."""
    with Pipeline.load(export, backend=backend, precision=precision) as pipe:

        def draw(control: np.ndarray, prompt: str, seed: int) -> np.ndarray:
            result = pipe.txt2img(
                prompt,
                controlnet=name,
                control_image=control,
                num_inference_steps=steps,
                guidance_scale=guidance,
                seed=seed,
            )
            return np.asarray(result.images[0])

        return map_accuracy(draw, map_cases(count))


def _centre(region: np.ndarray) -> tuple[float, float]:
    """(x, y) in pixels of the centre of an (H, W) bool region, as shapes.shape_centroid measures it."""
    ys, xs = np.nonzero(region)
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def semantic_accuracy(
    export: Path,
    count: int,
    backend: str = "ort-cpu",
    steps: int = 20,
    guidance: float = DEMO_GUIDANCE,
    seed: int = 123,
    precision: str | None = None,
    **options: Any,
) -> dict[str, float]:
    """Shares of ``count`` random captions whose picture has the asked shape colour, background, both, kind, place.

    "position" is the share of the captions that name a place; ``precision``: the backend's arithmetic. ``options``
    go to every txt2img call (e.g. ``cache_interval=3``, ``vae="tiny"``: the per-image levers' quality gate).
    """
    rng = np.random.default_rng(seed)
    hits = dict.fromkeys(SCORES, 0)
    placed = 0  # captions that name a place
    with Pipeline.load(export, backend=backend, precision=precision) as pipe:
        for i in range(count):
            scene = shapes.sample_scene(rng)
            caption = shapes.sample_caption(scene, rng)
            image = np.asarray(
                pipe.txt2img(caption, num_inference_steps=steps, guidance_scale=guidance, seed=i, **options).images[0]
            )
            colour, background = shapes.dominant_colours(image)
            hits["shape_colour"] += colour == scene.colour
            hits["background"] += background == scene.background
            hits["colours"] += (colour, background) == (scene.colour, scene.background)
            hits["kind"] += shapes.shape_kind(image) == scene.shape
            if caption.endswith(scene.position):
                placed += 1
                hits["position"] += shapes.shape_position(image) == scene.position
    return {name: hits[name] / (placed if name == "position" else count) for name in SCORES}


SENSITIVITY_PROMPTS = (  # (the prompt, its place changed, its colour changed)
    "a red circle on a blue background, top left",
    "a red circle on a blue background, bottom right",
    "a green circle on a blue background, top left",
)


def word_sensitivity(folder: Path, seeds: int = 8) -> dict[str, float]:
    """Mean |change| of a diffusers model folder's UNet output at the first of 20 steps, same noise, when the
    prompt's place words change ("place") and when its shape colour changes ("colour")."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.scheduler.set_timesteps(20)
    ids = pipe.tokenizer(list(SENSITIVITY_PROMPTS), padding="max_length", return_tensors="pt").input_ids
    config = pipe.unet.config
    shape = (1, config.in_channels, config.sample_size, config.sample_size)  # latents (1, 4, 8, 8)
    changes = {"place": [], "colour": []}
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]  # (3, 77, width)
        for seed in range(seeds):
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            out = pipe.unet(noise.repeat(3, 1, 1, 1), pipe.scheduler.timesteps[0], states).sample
            changes["place"].append((out[0] - out[1]).abs().mean().item())
            changes["colour"].append((out[0] - out[2]).abs().mean().item())
    return {name: float(np.mean(values)) for name, values in changes.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "export", type=Path, nargs="?", help="an sdtrt export of the demo model (e.g. artifacts/tiny-sd-onnx)"
    )
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--precision", default=None, help="the backend's arithmetic (openvino: bf16, fp32, int8)")
    parser.add_argument("--cache-interval", type=int, default=1, help="score with step caching (add-step-cache)")
    parser.add_argument("--tiny-vae", action="store_true", help="score decoding with the export's tiny VAE")
    parser.add_argument("--controlnet", type=Path, help="score this ControlNet folder (diffusers, torch) instead")
    parser.add_argument("--base", type=Path, default=Path("export/assets/tiny-sd"), help="its demo model folder")
    parser.add_argument("--attached", metavar="NAME", help="score the ControlNet attached to the export as NAME")
    parser.add_argument(
        "--sensitivity",
        type=Path,
        metavar="FOLDER",
        help="how much place and colour words move a diffusers model folder's first denoising step (word_sensitivity)",
    )
    args = parser.parse_args(argv)
    if args.sensitivity:
        changes = word_sensitivity(args.sensitivity)
        print(f"first step's mean |change|: place words {changes['place']:.4f}, colour words {changes['colour']:.4f}")
        return
    if args.controlnet:
        import torch

        from train.controlnet import diffusers_drawer

        torch.set_num_threads(1)
        shares = map_accuracy(diffusers_drawer(args.base, args.controlnet), map_cases(args.count))
    elif args.export and args.attached:
        shares = map_accuracy_on_runtime(args.export, args.attached, args.count, args.backend, precision=args.precision)
    elif args.export:
        vae = "tiny" if args.tiny_vae else "full"
        shares = semantic_accuracy(
            args.export, args.count, args.backend, precision=args.precision, cache_interval=args.cache_interval, vae=vae
        )
    else:
        parser.error("give an export folder or --controlnet FOLDER")
    unit = "maps" if args.controlnet or args.attached else "captions"
    print(", ".join(f"{name} {share:.1%}" for name, share in shares.items()) + f" of {args.count} {unit}")


if __name__ == "__main__":
    main()
