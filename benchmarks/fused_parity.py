"""ONNX Runtime's fused fp16 graphs against the plain fp16 ones on the CUDA provider, on a real-sized export.

    python -m benchmarks.fused_parity artifacts/bench/sd15/onnx-fp16 --side 64 --out parity.json

The tiny models' GPU tests (tests/test_ort_fusion.py) hold the fused graphs to the fp32 reference; this
runs the shapes the benchmark measures (SD-1.5's head size 40, SDXL's 64; flash and memory-efficient
kernels pick by shape), where only fp16 exports exist. Bound: max |fused - plain| <= 2e-2 x max(1, max
|plain|), the fp16 tolerance of tests/test_gpu.py; the JSON records each network's error and verdict.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sdtrt.engine.manifest import load_manifest
from sdtrt.engine.ort_cuda import OrtCudaSession

FP16_TOL = 2e-2


def _feeds(inputs, dims: dict[str, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in inputs:
        shape = spec.bind(dims)
        if spec.name == "timestep":
            feeds[spec.name] = np.full(shape, 500, dtype=spec.dtype)
        elif np.dtype(spec.dtype).kind == "f":
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def compare(folder: Path, side: int, batch: int) -> dict[str, dict]:
    """Each fused fp16 network of ``folder`` against its plain fp16 graph at latent ``side``."""
    manifest = load_manifest(folder)
    dims = {"batch": batch, "latent_height": side, "latent_width": side, "height": 8 * side, "width": 8 * side}
    results = {}
    for name, component in manifest.components.items():
        if "fp16" not in component.ort_fused:
            continue
        plain_file, fused_file = component.files["fp16"], component.ort_fused["fp16"]
        feeds = _feeds(plain_file.inputs, {**dims, "batch": batch if name == "unet" else 1}, np.random.default_rng(0))
        outputs = []
        for file in (plain_file, fused_file):
            session = OrtCudaSession(folder / file.path, cuda_graph=False)
            outputs.append(session.run(feeds))
            session.close()
        plain, fused = outputs
        errors = {n: float(np.abs(fused[n].astype(np.float32) - plain[n].astype(np.float32)).max()) for n in plain}
        scale = {n: max(1.0, float(np.abs(plain[n].astype(np.float32)).max())) for n in plain}
        ok = all(errors[n] <= FP16_TOL * scale[n] for n in plain)
        results[name] = {"max_abs_error": errors, "scale": scale, "tolerance": FP16_TOL, "ok": ok}
        print(f"{name}: max |fused - plain| {errors} (scale {scale}): {'ok' if ok else 'ABOVE'} {FP16_TOL} x scale")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fused_parity", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="an sdtrt export with --precision fp16 --ort-fused")
    parser.add_argument("--side", type=int, default=64, help="latent side (default 64: 512 px)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    results = compare(args.folder, args.side, args.batch)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
