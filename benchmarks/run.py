"""The benchmark runner: sdtrt's backends and the diffusers peers, measured in one invocation.

    python -m benchmarks.run --model sd15 --backend openvino ort-cpu torch torch-bf16 --height 256 --width 256

Each backend runs in a worker process of its own (so its peak memory is its own); every row is
appended to a JSONL file and carries its ratio to each peer measured in the same run. A markdown
table and a PNG of the run are written beside the JSONL file. Backends this machine cannot run are
skipped with one line each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import per_image
from benchmarks.harness import GPU_BACKENDS, SDTRT_BACKENDS, TORCH_BACKENDS, Job
from benchmarks.measure import cpu_cores, cpu_name, gpu_name, library_versions
from benchmarks.presets import PRESETS
from benchmarks.report import markdown, row_shape, write_report

log = logging.getLogger("benchmarks")

BACKENDS = (*SDTRT_BACKENDS, *TORCH_BACKENDS)
GPU_DEFAULT = ("trt", "ort-cuda", "torch", "torch-graph", "torch-compile")
CPU_DEFAULT = ("openvino", "openvino-fp32", "ort-cpu", "torch", "torch-bf16")
SWEEP = [(size, batch) for size in (512, 768, 1024) for batch in (1, 2, 4)]
SCHEMA = 1
INT8_BACKENDS = {"openvino-int8", "ort-cpu-int8"}  # the export is quantized first (`sdtrt quantize`)
REPO = Path(__file__).resolve().parents[1]  # on the workers' PYTHONPATH: benchmarks is not installed


def _parser() -> argparse.ArgumentParser:
    from sdtrt.runtime.schedulers import SCHEDULERS

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark sdtrt's backends against diffusers in one run; rows are appended as JSONL.",
    )
    p.add_argument("--model", default="sd15", help=f"a preset ({', '.join(PRESETS)}) or a diffusers folder")
    p.add_argument(
        "--backend",
        nargs="+",
        choices=BACKENDS,
        default=None,
        help=f"backends to measure (default: {' '.join(GPU_DEFAULT)} with a GPU, {' '.join(CPU_DEFAULT)} without)",
    )
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument(
        "--batch", type=int, default=2, help="UNet batch: even = batch/2 images with CFG, odd = no CFG (default 2)"
    )
    p.add_argument("--steps", type=int, default=30, help="denoising steps of the end-to-end run (default 30)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the model's own")
    p.add_argument(
        "--export", type=Path, default=None, help="an existing sdtrt export of --model (default: export, cached)"
    )
    p.add_argument("--sweep", action="store_true", help="every size 512/768/1024 x batch 1/2/4")
    p.add_argument(
        "--cache-interval", type=int, nargs="+", default=[1], metavar="N", help="sdtrt rows per step-cache interval"
    )
    p.add_argument("--tiny-vae", action="store_true", help="sdtrt rows with the tiny VAE too (per_image.py)")
    p.add_argument("--warmup", type=int, default=3, help="untimed UNet steps first (default 3)")
    p.add_argument("--timed-steps", type=int, default=20, help="timed UNet steps (default 20)")
    p.add_argument("--e2e-runs", type=int, default=1, help="timed end-to-end runs, medians reported (default 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for ORT and torch (default: all cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the torch peers run")
    p.add_argument("--seed", type=int, default=0, help="preset weights and inputs (default 0)")
    p.add_argument("--root", type=Path, default=Path("artifacts/bench"), help="models and exports cache")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bench.jsonl"), help="JSONL file to append to")
    p.add_argument(
        "--no-interleave",
        dest="interleave",
        action="store_false",
        help="measure the CPU backends one after another instead of turn by turn side by side",
    )
    p.add_argument("--no-report", action="store_true", help="skip the markdown table and the PNG")
    p.add_argument(
        "--serving",
        action="store_true",
        help="instead: the serving row (benchmarks/serving.py: `sdtrt serve` on the demo model or --export, "
        "images/s and p50/p99 at 1/4/16 clients, batching on and off) into benchmarks/results/serving.jsonl",
    )
    p.add_argument(
        "--lora-swap",
        action="store_true",
        help="instead: the LoRA swap table (benchmarks/lora_swap.py: load, swap, rescale, unload on every CPU "
        "backend, interleaved, and the UNet step with and without adapters) into benchmarks/results/lora-swap.jsonl",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show a failed worker's traceback")
    return p


class _Worker:
    """One worker process: its request and result files, its stderr log and, interleaved, its turn pipes."""

    def __init__(self, folder: Path, request: dict[str, Any], threads: int, turns: bool) -> None:
        folder.mkdir()
        self.result_path, self.log_path = folder / "result.json", folder / "stderr.log"
        self.grant = self.done = None  # the parent's ends of the turn pipes
        child_fds: tuple[int, ...] = ()
        if turns:
            grant_read, self.grant = os.pipe()
            self.done, done_write = os.pipe()
            child_fds = (grant_read, done_write)
            request = {**request, "turn_fds": list(child_fds)}
        (folder / "request.json").write_text(json.dumps(request))
        env = {**os.environ, "SDTRT_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        command = [sys.executable, "-m", "benchmarks.worker", str(folder / "request.json"), str(self.result_path)]
        with open(self.log_path, "w", encoding="utf-8") as stderr:  # a file: a full pipe would block the worker
            self.proc = subprocess.Popen(command, env=env, stderr=stderr, pass_fds=child_fds)
        for fd in child_fds:
            os.close(fd)

    def take_turn(self) -> bool:
        """Let the worker do one unit of work and wait for it; False once the worker has no more to do."""
        try:
            os.write(self.grant, b"g")
        except BrokenPipeError:
            return False
        return os.read(self.done, 1) == b"d"

    def result(self) -> dict[str, Any]:
        """Wait for the worker; its result, or why it failed (a crash, or killed for memory)."""
        self.proc.wait()
        for fd in (self.grant, self.done):
            if fd is not None:
                os.close(fd)
        stderr = self.log_path.read_text(encoding="utf-8", errors="replace").strip()
        if self.result_path.is_file():
            result = json.loads(self.result_path.read_text())
            if result["status"] != "ok":
                log.debug("worker stderr:\n%s", stderr)
            return result
        if self.proc.returncode == -signal.SIGKILL:
            return {"status": "failed", "reason": "the worker was killed (SIGKILL: out of memory?)"}
        last = stderr.splitlines()[-1] if stderr else ""
        return {"status": "failed", "reason": f"worker exited with code {self.proc.returncode}: {last}"}


def _run_workers(requests: Sequence[dict[str, Any]], threads: int, interleave: bool = False) -> list[dict[str, Any]]:
    """Run worker tasks, each in a fresh process; return their results in order.

    ``interleave`` starts them together and grants turns round robin, one unit of work at a time (a UNet
    step, an end-to-end run): each then meets the same machine load, which keeps a comparison fair on a
    shared machine. Without it they run one after another.
    """
    with tempfile.TemporaryDirectory(prefix="sdtrt-bench-") as work:
        folders = [Path(work) / str(i) for i in range(len(requests))]
        if not interleave:
            return [_Worker(f, r, threads, turns=False).result() for f, r in zip(folders, requests, strict=True)]
        workers = [_Worker(f, r, threads, turns=True) for f, r in zip(folders, requests, strict=True)]
        active = workers
        while active:
            active = [w for w in active if w.take_turn()]
        return [w.result() for w in workers]


def _sdtrt_availability(backend: str) -> tuple[str | None, str]:
    """(the ONNX variant it runs, "") for an sdtrt benchmark backend this machine can run, else (None, the
    one-line reason).

    Asks the engine's probes only: nothing is opened on the GPU in this process.
    """
    from sdtrt.engine.backends import BACKENDS, probe, select_backend
    from sdtrt.engine.errors import SdtrtError

    engine_backend, precision = SDTRT_BACKENDS[backend]
    try:
        kind, _ = select_backend(engine_backend, probe)
        if precision is not None:
            BACKENDS[kind].compute(precision)  # an arithmetic precision the backend does not offer
    except SdtrtError as exc:
        return None, str(exc)
    return BACKENDS[kind].precision, ""


def _model_class(model_dir: Path) -> str:
    return json.loads((model_dir / "model_index.json").read_text()).get("_class_name", "?")


def _native_size(model_dir: Path) -> int:
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _scheduler_name(model_dir: Path, requested: str | None) -> str:
    from sdtrt.runtime.schedulers import make_scheduler

    if requested is not None:
        return requested
    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    return make_scheduler(None, config).name


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Give every measured row its ratio to each peer measured at the same shape in the same run.

    ``unet_speedup`` and ``e2e_speedup`` are the peer's time over the row's (above 1: the row is faster),
    ``unet_cpu_speedup`` the same in CPU time (CPU rows); ``memory_ratio`` is the row's peak memory over
    the peer's, on the same kind of device only.
    """
    measured = [r for r in rows if r["status"] == "ok"]
    for row in measured:
        row["vs"] = {}
        for peer in measured:
            if peer is row or peer["backend"] not in TORCH_BACKENDS or row_shape(peer) != row_shape(row):
                continue
            ratio = {
                "unet_speedup": peer["unet_ms_median"] / row["unet_ms_median"],
                "e2e_speedup": peer["e2e_ms"] / row["e2e_ms"],
            }
            if peer["device"] == row["device"] == "cpu":
                ratio["unet_cpu_speedup"] = peer["unet_cpu_ms_median"] / row["unet_cpu_ms_median"]
            if peer["device"] == row["device"] and peer["peak_memory_mib"] and row["peak_memory_mib"]:
                ratio["memory_ratio"] = row["peak_memory_mib"] / peer["peak_memory_mib"]
            row["vs"][peer["backend"]] = ratio


class BenchmarkError(RuntimeError):
    """A run that cannot start (the model cannot be built or found); one line for the user."""


def _plan(backends: Sequence[str], device: str, gpu: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """Which backends can run here: ({sdtrt backend: the ONNX variant it runs}, {backend: why it is skipped})."""
    precisions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for backend in backends:
        if backend in TORCH_BACKENDS:
            if backend in GPU_BACKENDS and device != "cuda":
                skipped[backend] = "needs a CUDA GPU; none here" if gpu is None else "needs --device cuda"
            continue
        precision, reason = _sdtrt_availability(backend)
        if precision is None:
            skipped[backend] = reason
        else:
            precisions[backend] = precision
    return precisions, skipped


def _measure(jobs: Sequence[Job], rows: Sequence[dict[str, Any]], interleave: bool) -> None:
    """Run ``jobs`` in workers (interleaved or one by one) and complete their ``rows`` with the metrics."""
    names = ", ".join(job.backend for job in jobs)
    job = jobs[0]
    print(f"measure {names} {job.width}x{job.height} batch {job.batch}{' (interleaved)' * interleave} ...", flush=True)
    started = time.perf_counter()
    results = _run_workers([{"task": "measure", "job": j.to_dict()} for j in jobs], job.threads, interleave)
    for job, row, result in zip(jobs, rows, results, strict=True):
        row.update(result, wall_s=time.perf_counter() - started, interleaved=interleave)
        if row["status"] == "ok":
            row["peak_memory_mib"] = row["peak_device_mib"] if job.device == "cuda" else row["peak_rss_mib"]
        else:
            print(f"  {job.backend} failed: {row['reason']}")


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Parse the command line, measure, append the rows to --out, write the report; return the rows."""
    args = _parser().parse_args(argv)
    if args.serving:
        from benchmarks import serving

        forwarded = ["--export", str(args.export)] if args.export else []
        forwarded += ["--threads", str(args.threads)] if args.threads else []
        return serving.run(forwarded)
    if args.lora_swap:
        from benchmarks import lora_swap

        return lora_swap.run(["--model", args.model, "--root", str(args.root), "--steps", str(args.timed_steps)])
    if args.verbose:
        log.setLevel(logging.DEBUG)
    gpu = gpu_name()
    device = ("cuda" if gpu else "cpu") if args.device == "auto" else args.device
    threads = args.threads or cpu_cores()
    backends = args.backend or list(GPU_DEFAULT if device == "cuda" else CPU_DEFAULT)
    precisions, skipped = _plan(backends, device, gpu)

    needed = sorted(set(precisions.values()))
    log.info("preparing %s (exports: %s)", args.model, ", ".join(needed) or "none")
    request = {"task": "prepare", "model": args.model, "root": str(args.root), "precisions": needed}
    request.update(seed=args.seed, export=None if args.export is None else str(args.export))
    if INT8_BACKENDS & set(precisions):  # calibrated at the size measured (default: the native one)
        request["int8"] = {"height": args.height, "width": args.width}
    request.update(step_cache=max(args.cache_interval) > 1, tiny_vae=args.tiny_vae)
    (prepared,) = _run_workers([request], threads)
    if prepared["status"] != "ok":
        raise BenchmarkError(f"cannot prepare {args.model}: {prepared['reason']}")
    model_dir, exports = Path(prepared["model_dir"]), prepared["exports"]
    for backend, precision in precisions.items():
        if "error" in exports[precision]:
            skipped[backend] = f"sdtrt export: {exports[precision]['error']}"
    for backend, reason in skipped.items():
        print(f"skip {backend}: {reason}")

    native = _native_size(model_dir)
    shapes = (
        [(s, s, b) for s, b in SWEEP] if args.sweep else [(args.height or native, args.width or native, args.batch)]
    )
    base = {
        "schema": SCHEMA,
        "run_id": f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_cores": cpu_cores(),
        "gpu": gpu,
        "versions": library_versions(),
        "model": args.model,
        "model_dir": str(model_dir),
        "pipeline": _model_class(model_dir),
        "model_build_s": prepared["build_s"],
        "steps": args.steps,
        "scheduler": _scheduler_name(model_dir, args.scheduler),
        "warmup": args.warmup,
        "timed_steps": args.timed_steps,
        "e2e_runs": args.e2e_runs,
        "threads": threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for height, width, batch in shapes:
        shape_rows: list[dict[str, Any]] = []
        pending: list[tuple[Job, dict[str, Any]]] = []  # what to measure, and the row each completes
        for backend, (interval, vae) in (
            (b, v) for b in backends for v in per_image.variants(b, args.cache_interval, args.tiny_vae)
        ):
            export = exports.get(precisions.get(backend, ""), {})
            on_gpu = backend in GPU_BACKENDS or (backend == "torch" and device == "cuda")
            job = Job(
                backend=backend,
                model_dir=str(model_dir),
                export_dir=export.get("dir"),
                height=height,
                width=width,
                batch=batch,
                steps=args.steps,
                scheduler=args.scheduler,
                warmup=args.warmup,
                timed_steps=args.timed_steps,
                e2e_runs=args.e2e_runs,
                threads=threads,
                device="cuda" if on_gpu else "cpu",
                seed=args.seed,
                cache_interval=interval,
                vae=vae,
            )
            row = {
                **base,
                "backend": backend,
                "device": job.device,
                "device_name": gpu if on_gpu else f"{base['cpu']} ({base['cpu_cores']} cores)",
                "height": height,
                "width": width,
                "batch": batch,
                "images": job.images,
                "cfg": job.cfg,
                "export_s": export.get("export_s"),
                **({"quantize_s": export.get("quantize_s")} if backend in INT8_BACKENDS else {}),
                "export_cached": export.get("cached"),
                "cache_interval": interval,
                "vae": vae,
            }
            if backend in skipped:
                row.update(status="skipped", reason=skipped[backend])
            else:
                pending.append((job, row))
            shape_rows.append(row)
        # the CPU backends side by side (they meet the machine's load alike); GPU ones one by one, as each
        # reads the device's memory in use, which another worker's allocations would inflate
        on_cpu = [p for p in pending if p[0].device == "cpu"]
        groups = [on_cpu] if args.interleave and len(on_cpu) > 1 else [[p] for p in on_cpu]
        groups += [[p] for p in pending if p[0].device != "cpu"]
        for group in groups:
            _measure([job for job, _ in group], [row for _, row in group], interleave=len(group) > 1)
        add_ratios(shape_rows)
        with open(args.out, "a", encoding="utf-8") as f:  # shape by shape: a long sweep keeps what it measured
            f.writelines(json.dumps(row) + "\n" for row in shape_rows)
        rows.extend(shape_rows)
    print(markdown(rows))
    if max(args.cache_interval) > 1 or args.tiny_vae:
        print(per_image.table(rows))
    if not args.no_report:
        md, png = write_report(rows, args.out.with_suffix(".md"), args.out.with_suffix(".png"))
        print(f"rows appended to {args.out}; report {md}, {png}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    try:
        run(argv)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
