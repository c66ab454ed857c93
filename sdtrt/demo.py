"""`sdtrt demo`: export the embedded demo model once, then draw a prompt or a labelled grid of prompts on the CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sdtrt.engine.errors import InvalidInputError, ManifestError

log = logging.getLogger("sdtrt")

DEMO_ROOT = Path("artifacts")
# The embedded demo model knows one coloured shape on a coloured background (see train/shapes.py).
DEMO_PROMPT = "a yellow circle on a blue background, top left"
# low: the demo model is v-prediction at zero terminal SNR, and stronger guidance rounds its squares into circles
# (README 'The demo model': kind 86.5 % at 1.5, 79 % at 2, 67.5 % at 3, 65 % at 5)
DEMO_GUIDANCE = 1.5
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

# Prompts for the shipped example maps (export/assets/maps): the map says where the shape is and which kind,
# the prompt its colours; `sdtrt demo --map examples` draws them all
EXAMPLE_MAP_PROMPTS = {
    "circle-top-left": "a yellow circle on a blue background",
    "small-circle-right": "a small white circle on a red background",
    "square-bottom-right": "a red square on a white background",
    "triangle-center": "a green triangle on a black background",
}


def demo_model_dir() -> Path:
    """The embedded demo model: a diffusers folder shipped in the package (trained by train/tiny.py)."""
    return _assets() / "tiny-sd"


def demo_controlnet_dir() -> Path:
    """The demo model's tiny ControlNet: a diffusers folder shipped in the package (trained by train/controlnet.py),
    whose control image is a semantic map of the shapes world."""
    return _assets() / "tiny-controlnet"


def demo_tiny_vae_dir() -> Path:
    """The demo model's tiny VAE: a diffusers AutoencoderTiny folder shipped in the package, distilled from the demo
    model's own VAE (train/tiny_vae.py); `sdtrt demo --tiny-vae` draws with it."""
    return _assets() / "tiny-vae"


def demo_maps() -> dict[str, Path]:
    """The example semantic maps shipped with the package, by name (file name without .png)."""
    return {path.stem: path for path in sorted((_assets() / "maps").glob("*.png"))}


def _assets() -> Path:
    import sdtrt.export

    return Path(sdtrt.export.__file__).parent / "assets"


def run_demo(
    root: Path,
    prompt: str | None,
    steps: int,
    guidance: float,
    seed: int,
    grid: bool,
    quiet: bool,
    semantic_map: str | None = None,
    tiny_vae: bool = False,
) -> None:
    """Export the demo model to ROOT/tiny-sd-onnx unless a current export is there, then draw on ONNX Runtime CPU.

    Writes ROOT/demo.png (``prompt``, default DEMO_PROMPT), or with ``grid`` ROOT/demo-grid.png
    (DEMO_GRID_PROMPTS, one seed), or with ``semantic_map`` ROOT/demo-map.png: drawn where the map says by the
    demo's tiny ControlNet, attached to the export first. ``semantic_map`` is a PNG's path, the name of a shipped
    example map (its prompt from EXAMPLE_MAP_PROMPTS unless one is given), or "examples": a grid of them all.
    ``tiny_vae``: decode with the demo's tiny VAE (``vae="tiny"``), attached to the export first.
    """
    from sdtrt.generate import check_output, generate_images

    out = root / ("demo-grid.png" if grid else "demo-map.png" if semantic_map else "demo.png")
    check_output(out)  # before the export and the drawing, not after them
    control = {} if semantic_map in (None, "examples") else _control(_map_path(semantic_map))  # as early
    export_dir = _current_export(root, quiet, with_controlnet=semantic_map is not None, with_tiny_vae=tiny_vae)
    vae = "tiny" if tiny_vae else "full"
    if grid or semantic_map == "examples":
        cells = [(p, {"vae": vae}) for p in DEMO_GRID_PROMPTS]
        if semantic_map == "examples":
            maps = demo_maps()
            cells = [(EXAMPLE_MAP_PROMPTS[name], {**_control(maps[name]), "vae": vae}) for name in EXAMPLE_MAP_PROMPTS]
        _demo_grid(export_dir, out, cells, steps, guidance, seed, quiet)
        return
    if prompt is None:
        prompt = EXAMPLE_MAP_PROMPTS.get(semantic_map or "", DEMO_PROMPT)
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
        vae=vae,
        **control,
    )


def _control(path: Path) -> dict[str, Any]:
    """The txt2img options that draw where the semantic map at ``path`` says."""
    return {"controlnet": "map", "control_image": path}


def _map_path(semantic_map: str) -> Path:
    """A shipped example map by name, else the path given; one clear error for neither."""
    maps = demo_maps()
    if semantic_map in maps:
        return maps[semantic_map]
    if not Path(semantic_map).is_file():
        raise InvalidInputError(
            f"--map {semantic_map}: no such file, and no example map of that name "
            f"(examples: {', '.join(maps)}; or 'examples' for all of them)"
        )
    from PIL import Image

    try:  # a picture at all: checked before the export, not after it
        with Image.open(semantic_map) as picture:
            picture.verify()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"--map {semantic_map}: not an image PIL can read ({exc})") from None
    return Path(semantic_map)


def _current_export(root: Path, quiet: bool, with_controlnet: bool, with_tiny_vae: bool = False) -> Path:
    """ROOT/tiny-sd-onnx, exported again where it is missing or stale; with the demo ControlNet attached as "map"
    and the demo's tiny VAE, where asked (each again where the shipped one changed)."""
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
    if with_controlnet:
        from sdtrt.export.controlnet import attach_controlnet

        attached = load_manifest(export_dir).controlnets.get("map", {})
        source = demo_controlnet_dir()
        if _stale(attached, source):
            log.info("attaching the demo ControlNet to %s", export_dir)
            attach_controlnet(export_dir, source, name="map", overwrite=True)
    if with_tiny_vae:
        from sdtrt.export.tiny_vae import attach_tiny_vae

        if _stale(load_manifest(export_dir).tiny_vae or {}, demo_tiny_vae_dir()):
            log.info("attaching the demo's tiny VAE to %s", export_dir)
            attach_tiny_vae(export_dir, demo_tiny_vae_dir(), overwrite=True)
    return export_dir


def _stale(attached: dict[str, Any], source: Path) -> bool:
    """Whether a manifest's record of an attached network (``{"source": {"sha256": ...}}``) is not ``source``'s."""
    from sdtrt.engine.fsutil import sha256_tree

    return attached.get("source", {}).get("sha256") != sha256_tree(source)


def _demo_grid(
    folder: Path,
    out: Path,
    cells: list[tuple[str, dict[str, Any]]],
    steps: int,
    guidance: float,
    seed: int,
    quiet: bool,
) -> None:
    """Draw each (prompt, options) of ``cells`` with one seed into one PNG: each picture enlarged 3x (beside its
    control image, where it has one), its prompt below it."""
    import textwrap

    from PIL import Image, ImageDraw
    from tqdm.auto import tqdm

    from sdtrt.generate import save_png
    from sdtrt.runtime.pipeline import Pipeline

    tiles = []
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        for prompt, options in tqdm(cells, desc="grid", unit="image", disable=quiet):
            image = pipe.txt2img(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed, **options)
            control = options.get("control_image")
            shown = [Image.open(control).convert("RGB")] if control is not None else []
            tiles.append([*shown, image.images[0]])
    columns, side, label = 4, 3 * tiles[0][-1].width, 30  # label: pixels for two lines of the default font
    width = side * len(tiles[0])
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (side + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((prompt, _), pictures) in enumerate(zip(cells, tiles, strict=True)):
        x, y = i % columns * width, i // columns * (side + label)
        for k, picture in enumerate(pictures):
            sheet.paste(picture.resize((side, side), Image.Resampling.NEAREST), (x + k * side, y))
        draw.multiline_text((x + 4, y + side + 2), textwrap.fill(prompt, width // 6), fill="black", spacing=1)
    save_png(sheet, out)
    print(f"wrote {out} ({len(tiles)} prompts, seed {seed}, {steps} steps, guidance {guidance})")
