"""`sdtrt demo`: export the embedded demo model once, then draw a prompt or a labelled grid of prompts on the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

from sdtrt.engine.errors import ManifestError

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


def demo_model_dir() -> Path:
    """The embedded demo model: a diffusers folder shipped in the package (trained by train/tiny.py)."""
    import sdtrt.export

    return Path(sdtrt.export.__file__).parent / "assets" / "tiny-sd"


def run_demo(root: Path, prompt: str, steps: int, guidance: float, seed: int, grid: bool, quiet: bool) -> None:
    """Export the demo model to ROOT/tiny-sd-onnx unless a current export is there, then draw on ONNX Runtime CPU.

    Writes ROOT/demo.png, or with ``grid`` ROOT/demo-grid.png (DEMO_GRID_PROMPTS, one seed).
    """
    from sdtrt.engine.manifest import load_manifest
    from sdtrt.export.exporter import export_model, source_hash
    from sdtrt.generate import check_output, generate_images

    out = root / ("demo-grid.png" if grid else "demo.png")
    check_output(out)  # before the export and the drawing, not after them
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
        _demo_grid(export_dir, out, steps, guidance, seed, quiet)
        return
    generate_images(
        "txt2img",
        export_dir,
        prompt,
        out,
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

    from sdtrt.generate import save_png
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
    save_png(sheet, out)
    print(f"wrote {out} ({len(images)} prompts, seed {seed}, {steps} steps, guidance {guidance})")
