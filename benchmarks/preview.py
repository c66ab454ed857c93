"""What a watched job's progress previews cost per step: txt2img with the server's preview hook watching (the
tiny VAE decodes the first image's latents before every UNet call, serve/preview.py) beside the same run unwatched
(the hook keeps the latents and decodes nothing), taking turns run by run in one process.

    python -m benchmarks.preview EXPORT [--backend openvino] [--size 256] [--steps 10] [--rounds 3]

EXPORT needs a tiny VAE (``sdtrt add-tiny-vae``; benchmarks/prepare.py attaches a TAESD-sized one to the bench
exports). One JSON row on stdout: seconds per step watched and unwatched, their difference, and the tiny decode's
own seconds per preview (what the server's sdtrt_preview_seconds histogram observes).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.runtime.batching import BatchCall, run_batch
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.request import Request
from sdtrt.serve.preview import JobPreview, Previewer


def measure(
    export: Path, backend: str, precision: str | None, size: int, steps: int, rounds: int, guidance: float = 7.5
) -> dict[str, Any]:
    """Per-step seconds of ``rounds`` txt2img runs watched and unwatched (after one warm-up run of each)."""
    decodes: list[float] = []
    with Pipeline.load(export, backend=backend, precision=precision) as pipe:
        previewer = Previewer(pipe.manifest, linear=None, observe=decodes.append)
        if not previewer.tiny:
            raise SystemExit(f"{export} has no tiny VAE: attach one with `sdtrt add-tiny-vae`")
        options = {"seed": 0, "num_inference_steps": steps, "scheduler": "ddim", "guidance_scale": guidance}
        plan = pipe.plan("txt2img", Request("a lighthouse at dusk", height=size, width=size, **options))

        def run(watched: bool) -> float:
            state = JobPreview(watched_until=float("inf") if watched else 0.0)
            step = iter(range(steps))

            def on_sample(sample: np.ndarray, runner: Any) -> None:
                previewer.on_sample(state, sample, next(step), runner)

            t0 = time.perf_counter()
            (result,), _ = run_batch(pipe, [BatchCall(plan, on_sample=on_sample)])
            if isinstance(result, Exception):
                raise result
            return (time.perf_counter() - t0) / steps

        run(False), run(True)  # warm-up: sessions opened, shapes compiled
        decodes.clear()
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(rounds):
            for watched in (False, True):
                times[watched].append(run(watched))
        backend_kind = pipe.backend.kind
    plain, watched = statistics.median(times[False]), statistics.median(times[True])
    return {
        "export": str(export),
        "backend": backend_kind,
        "size": size,
        "steps": steps,
        "rounds": rounds,
        "guidance": guidance,
        "s_per_step_unwatched": round(plain, 5),
        "s_per_step_watched": round(watched, 5),
        "preview_cost_s_per_step": round(watched - plain, 5),
        "tiny_decode_s": round(statistics.median(decodes), 5),
        "decodes": len(decodes),
        "cpu": _cpu(),
    }


def _cpu() -> str:
    """The CPU's model name (Linux), else the machine's architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preview", description=__doc__.split("\n")[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args(argv)
    row = measure(args.export, args.backend, args.precision, args.size, args.steps, args.rounds, args.guidance)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
