"""How often the demo model draws the asked colours: ``python -m train.evaluate EXPORT_DIR [--count N]``.

Random captions of the shapes data set (seeded), one picture each through the NumPy runtime; a
picture counts when train.shapes.dominant_colours reads the asked shape colour and background.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sdtrt.runtime.pipeline import Pipeline
from train import shapes


def colour_accuracy(
    export: Path, count: int, backend: str = "ort-cpu", steps: int = 20, guidance: float = 5.0, seed: int = 123
) -> dict[str, float]:
    """Shares of ``count`` random captions whose picture has the asked shape colour, background, and both."""
    rng = np.random.default_rng(seed)
    hits = np.zeros(3)
    with Pipeline.load(export, backend=backend) as pipe:
        for i in range(count):
            scene = shapes.sample_scene(rng)
            caption = shapes.sample_caption(scene, rng)
            image = pipe.txt2img(caption, num_inference_steps=steps, guidance_scale=guidance, seed=i).images[0]
            colour, background = shapes.dominant_colours(np.asarray(image))
            hits += (
                colour == scene.colour,
                background == scene.background,
                (colour, background) == (scene.colour, scene.background),
            )
    return dict(zip(("shape_colour", "background", "both"), (hits / count).tolist(), strict=True))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="an sdtrt export of the demo model (e.g. artifacts/tiny-sd-onnx)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--backend", default="ort-cpu")
    args = parser.parse_args(argv)
    shares = colour_accuracy(args.export, args.count, args.backend)
    print(", ".join(f"{name} {share:.1%}" for name, share in shares.items()) + f" of {args.count} captions")


if __name__ == "__main__":
    main()
