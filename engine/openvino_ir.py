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
import logging
import subprocess
import sys
import time
from pathlib import Path

from sdtrt.engine.fsutil import atomic_dir, onnx_files

log = logging.getLogger(__name__)

IR_NAME = "model.xml"  # and model.bin beside it
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
    if (folder / IR_NAME).is_file():
        return folder / IR_NAME
    log.info("%s: converting to OpenVINO's format with fp16 weights, once (in %s)", onnx.name, folder.parent)
    start = time.perf_counter()
    command = [sys.executable, "-m", "sdtrt.engine.openvino_ir", str(onnx), str(folder)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s: could not convert to OpenVINO's format (%s): compiling from the ONNX file", onnx.name, exc)
        return None
    if done.returncode != 0 or not (folder / IR_NAME).is_file():
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        log.warning("%s: could not convert to OpenVINO's format (%s): compiling from the ONNX file", onnx.name, why)
        return None
    log.info("%s: converted in %.1f s", onnx.name, time.perf_counter() - start)
    return folder / IR_NAME


def convert(onnx: Path, folder: Path) -> None:
    """Write ``folder``/model.xml + model.bin: ``onnx`` with its fp32 weights stored as fp16. The folder
    appears whole or not at all; one that another process finished first is kept."""
    import openvino as ov

    model = ov.Core().read_model(str(onnx))
    try:
        with atomic_dir(folder) as staging:
            ov.save_model(model, str(staging / IR_NAME), compress_to_fp16=True)
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
