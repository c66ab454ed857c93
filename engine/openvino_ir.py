"""OpenVINO's own model format (IR) with fp16 weights, made once from an exported ONNX file.

Under bf16 arithmetic the OpenVINO backend compiles from an IR whose weights are stored as fp16:
OpenVINO maps the IR's weights file instead of reading the ONNX into memory, and fp16 halves what
it reads (bf16 keeps fewer mantissa bits than fp16, so the arithmetic is the same). The IR lives in
the OpenVINO cache folder, named after the ONNX file's digest, and is made by a child process:
converting an SD-1.5 UNet holds ~3.5 GiB for 15 s, which would otherwise stay the serving process's
peak. ``python -m sdtrt.engine.openvino_ir ONNX FOLDER`` is that child.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sdtrt.engine.fsutil import atomic_dir, onnx_files, write_json_atomic

log = logging.getLogger(__name__)

IR_NAME = "model.xml"
BIN_NAME = "model.bin"  # beside it: the weights
SIZES_NAME = "sizes.json"  # the bytes of model.xml and model.bin as written: a cheap look finds a damaged IR
CONVERT_TIMEOUT_S = 1800


def ir_folder(cache_root: Path, onnx: Path, digest: str) -> Path:
    """Where the fp16 IR of this ONNX file lives under the OpenVINO cache folder: named after the sha256 the
    manifest records and the size and modification time of its files now, so that a file replaced since
    the export is converted afresh (and meets the checks the ONNX file meets) rather than served stale."""
    stamp = [digest, *(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in onnx_files(onnx))]
    return cache_root / "ir" / f"{onnx.stem}-{hashlib.sha256(chr(0).join(stamp).encode()).hexdigest()[:16]}"


def fp16_ir(onnx: Path, digest: str, cache_root: Path) -> Path | None:
    """The IR file of ``onnx`` with fp16 weights, made now if it is not there yet; None (logged) where it
    cannot be made (an unwritable cache folder, a failed conversion)."""
    folder = ir_folder(cache_root, onnx, digest)
    if (why := ir_problem(folder)) is None:
        return folder / IR_NAME
    if folder.exists():  # a cache: what is damaged is made again
        log.warning("%s: the OpenVINO IR in %s is damaged (%s): converting it again", onnx.name, folder, why)
        discard(folder)
    log.info("%s: converting to OpenVINO's format with fp16 weights, once (in %s)", onnx.name, folder.parent)
    start = time.perf_counter()
    command = [sys.executable, "-m", "sdtrt.engine.openvino_ir", str(onnx), str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s: could not convert to OpenVINO's format (%s): compiling from the ONNX file", onnx.name, exc)
        return None
    if done.returncode != 0 or ir_problem(folder) is not None:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        log.warning("%s: could not convert to OpenVINO's format (%s): compiling from the ONNX file", onnx.name, why)
        return None
    log.info("%s: converted in %.1f s", onnx.name, time.perf_counter() - start)
    return folder / IR_NAME


def ir_problem(folder: Path) -> str | None:
    """What a cheap look finds wrong with the IR in ``folder`` (missing, or its files not of the sizes written),
    or None."""
    try:
        sizes = json.loads((folder / SIZES_NAME).read_text(encoding="utf-8"))
        actual = {name: (folder / name).stat().st_size for name in (IR_NAME, BIN_NAME)}
    except FileNotFoundError as exc:
        return f"{Path(exc.filename).name} is missing"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if sizes == actual else f"its files are {actual} bytes, not the {sizes} written"


def discard(folder: Path) -> None:
    """Remove a damaged IR folder (under a staging name first: a reader never sees half of it)."""
    aside = folder.with_name(f".{folder.name}.{os.getpid()}.discarded")
    try:
        os.replace(folder, aside)
    except OSError as exc:  # gone meanwhile, or not ours to remove: the conversion says what is wrong
        log.debug("could not move %s aside: %s", folder, exc)
        return
    shutil.rmtree(aside, ignore_errors=True)


def convert(onnx: Path, folder: Path) -> None:
    """Write ``folder``/model.xml + model.bin: ``onnx`` with its fp32 weights stored as fp16. The folder
    appears whole or not at all; one that another process finished first is kept."""
    import openvino as ov

    model = ov.Core().read_model(str(onnx))
    try:
        with atomic_dir(folder) as staging:
            ov.save_model(model, str(staging / IR_NAME), compress_to_fp16=True)
            sizes = {name: (staging / name).stat().st_size for name in (IR_NAME, BIN_NAME)}
            write_json_atomic(staging / SIZES_NAME, sizes)
    except FileExistsError:
        if not (folder / IR_NAME).is_file():
            raise


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m sdtrt.engine.openvino_ir ONNX FOLDER")
    try:
        convert(Path(sys.argv[1]), Path(sys.argv[2]))
    except (OSError, RuntimeError) as exc:
        sys.exit(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
