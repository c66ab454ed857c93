"""Drawing from the command line: check where the PNGs go, run a pipeline task with a progress bar, save them."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sdtrt.engine.errors import SdtrtError

if TYPE_CHECKING:
    from PIL import Image

Lora = tuple[Path, float]  # a LoRA adapter's file and scale


def image_paths(out: Path, count: int) -> list[Path]:
    """Where ``count`` images asked for as ``out`` go: ``out`` itself for one, else numbered beside it."""
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(count)]


def check_output(path: Path) -> None:
    """One error naming ``path`` unless a PNG can be written there: it is no folder, and its folder exists and
    takes new files, or can be created where it is missing. Checked before any work; nothing is left behind."""
    from sdtrt.engine.fsutil import special_file

    if kind := special_file(path):  # a device or a pipe is the user's: never replaced by a PNG
        raise SdtrtError(f"cannot write {path}: it is a {kind}, not a regular file (name a file for the PNG)")
    if path.is_dir():
        raise SdtrtError(f"cannot write {path}: it is a folder (name a file in it, e.g. {path / 'out.png'})")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists takes the new ones
        folder = folder.parent
    if not folder.is_dir():
        raise SdtrtError(f"cannot write {path}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):  # unnamed where the system allows it, and removed at once
            pass
    except OSError as exc:
        raise SdtrtError(f"cannot write {path}: {folder} takes no new files ({exc.strerror or exc})") from exc


def save_png(image: Image.Image, path: Path) -> None:
    """Write ``image`` as a PNG at ``path`` atomically: a failed write leaves no partial file, and its error
    names ``path`` (not the temporary file beside it)."""
    from sdtrt.engine.fsutil import atomic_path

    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
    except OSError as exc:
        raise SdtrtError(f"cannot write {path}: {exc.strerror or exc}") from exc


def generate_images(
    task: str,
    folder: Path,
    prompt: str,
    out: Path,
    quiet: bool,
    backend: str,
    loras: Sequence[Lora] = (),
    precision: str | None = None,
    **options,
) -> None:
    """Run the pipeline's ``task`` with a progress bar, write the PNGs, print seed and stage timings.

    ``loras``: (path, scale) of the LoRA adapters to apply first. Where the PNGs go, and the options every task
    shares, are checked before the model loads; the progress bar starts with the first step, after every check.
    """
    from tqdm.auto import tqdm

    from sdtrt.runtime.pipeline import Pipeline
    from sdtrt.runtime.plan import precheck
    from sdtrt.runtime.request import REQUEST_OPTIONS, Limits, Request

    shared = {name: options[name] for name in REQUEST_OPTIONS if name in options}
    own = {name: value for name, value in options.items() if name not in shared}
    _, request, _, _ = precheck(task, Request(prompt, **shared), own)  # the pipeline's own checks needing no model
    # the ceiling on images needs no model either (the one on sides does): before a PNG path is checked for each
    Limits.resolve(default_side=1, side_origin="").check_images(1, request.num_images)
    for path in image_paths(out, request.num_images):
        check_output(path)
    bar: tqdm | None = None
    with Pipeline.load(folder, backend=backend, precision=precision) as pipe:
        for path, scale in loras:
            pipe.load_lora(path, name=str(path), scale=scale)

        def advance(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, desc="denoise", unit="step", disable=quiet)
            bar.total = total  # a scheduler may take more UNet steps than asked (PNDM: one more)
            bar.update(done - bar.n)

        try:
            result = getattr(pipe, task)(prompt, progress=advance, **options)
        finally:
            if bar is not None:
                bar.close()
    paths = image_paths(out, len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        save_png(image, path)
    print(f"wrote {', '.join(map(str, paths))} (seed {result.seed}, {result.scheduler}, backend {result.backend})")
    print("  ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in result.timings.items()))
