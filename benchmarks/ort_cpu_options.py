"""Prototype: ONNX Runtime CPU session options for the UNet, A/B in one process (proposals for engine/, export/).

    python -m benchmarks.ort_cpu_options artifacts/bench/sd15/onnx-fp32 --threads 1 --rounds 6 [--fused]
    python -m benchmarks.ort_cpu_options artifacts/bench/sd15/onnx-fp32 --size 512 --only fused   # its peak RSS

Variants, each a session on the export's fp32 UNet:

  engine      what engine/ort_session.py opens today (all graph optimizations, sequential)
  no-spin     the same with intra-op spinning off (worker threads sleep instead of spinning between ops)
  cached-opt  the ORT-optimized graph saved once (optimized_model_filepath) and opened with optimizations
              off: a load-time saving. The saved graph is specific to this ORT version and CPU (NCHWc
              layouts), so a cache would be keyed by both.
  fused       (--fused) ORT's transformer optimizer run on the UNet with the CPU's fusions: attention into
              MultiHeadAttention / Attention, LayerNorm, SkipLayerNorm (GroupNorm, BiasSplitGelu, NhwcConv
              and packed QKV have CUDA kernels only). Building it takes minutes and ~10 GB.

Runs alternate between the variants round by round, so a shared machine's changing load falls on each
alike. Prints per variant: load seconds, wall and CPU-time medians per step, and the largest difference
from the first variant's output relative to its largest magnitude; with --only, the process's peak RSS.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.measure import peak_rss_mib
from sdtrt.engine.manifest import load_manifest
from sdtrt.engine.ort_session import import_onnxruntime

VARIANTS = ("engine", "no-spin", "cached-opt", "fused")


def _options(threads: int, spinning: bool = True, optimize: bool = True, save_to: Path | None = None):
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
        # the weights go to one data file beside it (a protobuf cannot hold an SD UNet's)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", save_to.name + ".data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return options


def _in_child(fn, *args) -> None:
    """Run ``fn(*args)`` in a fresh process and wait for it."""
    child = multiprocessing.get_context("spawn").Process(target=fn, args=args)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed (exit code {child.exitcode})")


def save_optimized(unet: Path, out: Path, threads: int) -> None:
    """Write the graph ORT optimizes ``unet`` into at load (ENABLE_ALL) to ``out``."""
    _open(unet, _options(threads, save_to=out))


def _open(path: Path, options) -> tuple[object, float]:
    ort = import_onnxruntime()
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return session, time.perf_counter() - start


def fuse_for_cpu(unet: Path, out: Path) -> None:
    """Write ``unet`` with ORT's transformer fusions that have CPU kernels (weights in ``out``.data)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    _patch_num_heads()
    options = FusionOptions("unet")
    for cuda_only in ("group_norm", "skip_group_norm", "bias_splitgelu", "nhwc_conv", "bias_add", "packed_qkv"):
        setattr(options, f"enable_{cuda_only}", False)
    options.enable_packed_kv = False
    model = optimize_model(
        str(unet), model_type="unet", opt_level=0, optimization_options=options, use_gpu=False, num_heads=0
    )
    model.save_model_to_file(str(out), use_external_data_format=True, all_tensors_to_one_file=True)


def _patch_num_heads() -> None:
    """ONNX Runtime 1.31's attention fusion calls int() on a shape-(1,) array, an error under NumPy 2;
    without this the fusion raises TypeError and nothing is fused. Its modules are imported under two
    names (onnxruntime.transformers.x and plain x), so both classes are patched."""
    for name, module in list(sys.modules.items()):
        if name.endswith("fusion_attention_unet") and hasattr(module, "FusionAttentionUnet"):
            fusion = module.FusionAttentionUnet
            original = fusion.get_num_heads

            def get_num_heads(self, reshape_q, is_torch2: bool = False, _original=original) -> int:
                parent = self.model.get_parent(reshape_q, 1) if is_torch2 else None
                if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                    heads = self.model.get_constant_value(parent.input[2])
                    if isinstance(heads, np.ndarray) and heads.size == 1:
                        return int(heads.reshape(-1)[0])
                return _original(self, reshape_q, is_torch2)

            fusion.get_num_heads = get_num_heads


def _feeds(folder: Path, batch: int, size: int) -> dict[str, np.ndarray]:
    """Random UNet inputs at (batch, C, size/8, size/8) in the manifest's fp32 dtypes."""
    spec = load_manifest(folder).component_file("unet", "fp32")
    dims = {"batch": batch, "latent_height": size // 8, "latent_width": size // 8}
    rng = np.random.default_rng(0)
    return {
        s.name: np.full(s.bind(dims), 999, s.dtype)
        if s.name == "timestep"
        else rng.standard_normal(s.bind(dims), dtype=np.float32).astype(s.dtype)
        for s in spec.inputs
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ort_cpu_options", description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="an sdtrt export with an fp32 UNet")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6, help="timed runs of each variant (default 6)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--fused", action="store_true", help="add the fused variant (minutes to build)")
    parser.add_argument("--only", choices=VARIANTS, help="just this variant, and report the process's peak RSS")
    args = parser.parse_args(argv)

    wanted = [args.only] if args.only else [v for v in VARIANTS if v != "fused" or args.fused]
    unet = args.export / load_manifest(args.export).component_file("unet", "fp32").path
    feeds = _feeds(args.export, args.batch, args.size)
    with tempfile.TemporaryDirectory(prefix="sdtrt-ort-opt-") as work:
        saved, fused = Path(work) / "unet.optimized.onnx", Path(work) / "unet.fused.onnx"
        # the variants' files are made in child processes: their memory stays out of this one's peak
        if "cached-opt" in wanted:
            _in_child(save_optimized, unet, saved, args.threads)
        if "fused" in wanted:
            _in_child(fuse_for_cpu, unet, fused)
        makers = {
            "engine": lambda: _open(unet, _options(args.threads)),
            "no-spin": lambda: _open(unet, _options(args.threads, spinning=False)),
            "cached-opt": lambda: _open(saved, _options(args.threads, optimize=False)),
            "fused": lambda: _open(fused, _options(args.threads)),
        }
        variants = {name: makers[name]() for name in wanted}
        outputs = {name: session.run(None, feeds)[0] for name, (session, _) in variants.items()}  # warm-up
        wall: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (session, _) in variants.items():
                w0, c0 = time.perf_counter(), time.process_time()
                session.run(None, feeds)
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    reference = outputs[wanted[0]]
    print(f"UNet {unet}, batch {args.batch}, {args.size}x{args.size}, {args.threads} thread(s), {args.rounds} rounds")
    for name, (_, load_s) in variants.items():
        error = float(np.abs(outputs[name] - reference).max() / np.abs(reference).max())
        print(
            f"{name:11s} load {load_s:6.1f} s  wall {np.median(wall[name]) * 1000:8.0f} ms"
            f"  cpu {np.median(cpu[name]) * 1000:8.0f} ms  rel. error vs {wanted[0]} {error:.1e}"
        )
    if args.only:
        print(f"peak RSS of this process: {peak_rss_mib():.0f} MiB")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
