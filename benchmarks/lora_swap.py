"""The LoRA swap table: what loading, swapping, rescaling and unloading an adapter costs on each CPU backend.

    python -m benchmarks.run --lora-swap --root /work/cache/bench

On the SD-1.5-shaped export (benchmarks/presets.py), two random rank-8 kohya LoRAs on the UNet's
attention and the text encoder, 256² one-step generations. "Swap cost" is the call plus what the
next generation takes beyond a warm one without it. All backends' pipelines stay open and take
turns (interleaved), one round after another; medians of ``--rounds``. The UNet step rows compare,
per backend and side by side, the session without branches (what runs until the first adapter
loads: the compiled weights alone) with the branched one at rank 0 (no adapter, after one was
unloaded) and with a rank-16 adapter on every attention projection. Rows go to
benchmarks/results/lora-swap.jsonl, the table to lora-swap.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.measure import cpu_name
from benchmarks.prepare import ensure_export, ensure_model

log = logging.getLogger("benchmarks")

BACKENDS = {"openvino bf16": ("openvino", "bf16"), "openvino fp32": ("openvino", "fp32"), "ort-cpu": ("ort-cpu", None)}
GENERATION = {"prompt": "a harbour at dusk", "num_inference_steps": 1, "height": 256, "width": 256, "seed": 0}
UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k")
UNET_TARGETS += ("attn2.to_v", "attn2.to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
COLUMNS = ("load A", "swap A → B", "rescale B", "unload", "set_lora_scale alone")
STEP_KINDS = ("plain graph", "rank 0", "rank 16", "static 16, rank 0", "static 16, rank 16")
FIRST = "first load"  # round 1's load A: the branches come in then, once (ONNX Runtime opens the branched plain graph,
# OpenVINO compiles them in: engine/openvino_session.py)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run --lora-swap", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd15", help="a preset of benchmarks/presets.py (default sd15)")
    p.add_argument("--root", type=Path, default=Path("artifacts/bench"), help="models and exports cache")
    p.add_argument(
        "--rounds", type=int, default=4, help="swap sequences per backend: the first, then medians (default 4)"
    )
    p.add_argument("--steps", type=int, default=5, help="timed UNet steps per session and round (default 5)")
    p.add_argument("--backend", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lora-swap.jsonl"))
    return p


def write_kohya(
    path: Path, weight_maps: dict, rank: int, seed: int, targets: dict[str, tuple[str, ...]], std: float = 0.02
) -> Path:
    """A random kohya LoRA file of ``rank`` on the modules of ``weight_maps`` whose names end with ``targets``, its
    factors normal with standard deviation ``std``."""
    from safetensors.numpy import save_file

    rng, prefixes, tensors = np.random.default_rng(seed), {"unet": "lora_unet_", "text_encoder": "lora_te_"}, {}
    for component, suffixes in targets.items():
        for param, (weight, *_) in weight_maps[component].by_param.items():
            module = param.removesuffix(".weight")
            if not module.endswith(suffixes):
                continue
            shape = weight.param_shape  # (out, in) for a Linear, (out, in, kh, kw) for a Conv
            key, pointwise = prefixes[component] + module.replace(".", "_"), (1,) * (len(shape) - 2)
            tensors[f"{key}.lora_down.weight"] = (rng.standard_normal((rank, *shape[1:])) * std).astype(np.float32)
            tensors[f"{key}.lora_up.weight"] = (rng.standard_normal((shape[0], rank, *pointwise)) * std).astype(
                np.float32
            )
            tensors[f"{key}.alpha"] = np.array(float(rank), np.float32)
    save_file(tensors, str(path))
    return path


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def swap_round(pipe, adapters: dict[str, Path]) -> dict[str, float]:
    """One sequence: load A, swap A -> B, rescale B, unload; each the call + the generation after it minus the
    generation just before it (warm, without the change), and the call alone ("<step> call")."""
    generate = lambda: pipe.txt2img(**GENERATION)  # noqa: E731
    generate()
    steps = {
        "load A": lambda: pipe.load_lora(adapters["a"]),
        "swap A → B": lambda: (pipe.unload_lora("a"), pipe.load_lora(adapters["b"])),
        "rescale B": lambda: pipe.set_lora_scale("b", 0.5),
        "unload": lambda: pipe.unload_lora(),
    }
    costs = {}
    for name, call in steps.items():
        before = _timed(generate)
        costs[f"{name} call"] = _timed(call)
        costs[name] = costs[f"{name} call"] + _timed(generate) - before
    pipe.load_lora(adapters["a"])
    costs["set_lora_scale alone"] = _timed(lambda: pipe.set_lora_scale("a", 0.7))
    pipe.unload_lora()
    return costs


def unet_steps(export: Path, backend: str, precision: str | None, steps: int) -> dict[str, float]:
    """Seconds per UNet step (batch 2, 256²): the unbranched session, branched at rank 0 and at rank 16."""
    from sdtrt.engine.artifact import open_artifact

    with open_artifact(export, backend=backend, precision=precision) as artifact:
        weight_map = artifact.weight_maps()["unet"]  # ONNX Runtime: the plain graph from now on
        branched = artifact.session("unet")
        rng = np.random.default_rng(0)
        width = artifact.inputs("unet")["encoder_hidden_states"].shape[-1]
        feeds = {
            "sample": rng.standard_normal((2, 4, 32, 32), dtype=np.float32),
            "timestep": np.full(2, 500.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, width), dtype=np.float32),
        }
        attention = [
            n for n in branched.branched if weight_map.weights[n].param.removesuffix(".weight").endswith(UNET_TARGETS)
        ]
        rank16 = {}
        for name in attention:
            out_features, in_features = weight_map.weights[name].param_shape[:2]
            rank16[name] = (
                (rng.standard_normal((16, in_features)) * 0.02).astype(np.float32),
                (rng.standard_normal((out_features, 16)) * 0.02).astype(np.float32),
            )
        unbranched = _unbranched_session(artifact, "unet", fused=None)
        sessions = {"before": (unbranched, None)}
        if getattr(unbranched, "name", "").endswith(".ort.onnx"):  # ONNX Runtime's fused graph: also its plain one
            sessions["plain graph"] = (_unbranched_session(artifact, "unet", fused=False), None)
        sessions |= {"rank 0": (branched, {}), "rank 16": (branched, rank16)}
        if backend == "openvino":  # the candidate with static branches: rank 16, zero-padded
            static = _static_session(artifact, "unet", precision, weight_map, 16)
            sessions |= {"static 16, rank 0": (static, {}), "static 16, rank 16": (static, rank16)}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(2):  # warm-up: compile
            for session, factors in sessions.values():
                if factors is not None:
                    session.set_factors(factors)
                session.run(feeds)
        for _ in range(steps):
            for name, (session, factors) in sessions.items():
                if factors is not None:
                    session.set_factors(factors)
                times[name].append(_timed(lambda s=session: s.run(feeds)))
        for session, _ in sessions.values():
            session.close()
    return {name: statistics.median(values) for name, values in times.items()}


def _static_session(artifact, network: str, compute: str, weight_map, rank: int):
    """An OpenVINO session whose branches have a fixed rank (the adapters' factors zero-padded to it)."""
    from sdtrt.engine.backends import openvino_cache_dir
    from sdtrt.engine.openvino_session import OpenVinoSession

    file = artifact.manifest.component_file(network, artifact.precision(network))
    return OpenVinoSession(
        artifact.folder / file.path,
        file.inputs,
        file.outputs,
        precision=compute,
        cache_dir=openvino_cache_dir(artifact.folder),
        weight_map=weight_map,
        digest=file.sha256,
        lora_rank=rank,
    )


def _unbranched_session(artifact, network: str, fused: bool | None):
    """The network's session without a weight map, hence without branches; ``fused`` None: as the backend ran it
    without a LoRA before branches (ONNX Runtime's fused graph where the export has one)."""
    from sdtrt.engine.backends import SessionTarget, component_fused, open_session

    precision = artifact.precision(network)
    if fused is None:
        fused = component_fused(artifact.backend, artifact.manifest, network, precision)
    return open_session(
        artifact.backend, SessionTarget(artifact.folder, artifact.manifest, network, precision, fused=fused)
    )


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = _parser().parse_args(argv)
    from sdtrt.runtime.pipeline import Pipeline

    model_dir, _ = ensure_model(args.model, args.root)
    export, _, _ = ensure_export(args.model, model_dir, args.root, "fp32")
    pipes = {
        name: Pipeline.load(export, backend=BACKENDS[name][0], precision=BACKENDS[name][1]) for name in args.backend
    }
    with tempfile.TemporaryDirectory() as folder:
        maps = next(iter(pipes.values())).sessions.artifact.weight_maps()
        targets = {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS}
        adapters = {
            key: write_kohya(Path(folder) / f"{key}.safetensors", maps, 8, seed, targets)
            for seed, key in enumerate("ab")
        }
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in pipes}
        for number in range(args.rounds):
            for name, pipe in pipes.items():
                rounds[name].append(swap_round(pipe, adapters))
                log.info("round %d %s: %s", number + 1, name, {k: round(v, 2) for k, v in rounds[name][-1].items()})
    for pipe in pipes.values():
        pipe.close()
    rows = []
    for name in pipes:
        backend, precision = BACKENDS[name]
        row = {"backend": name, FIRST: rounds[name][0]["load A"]}
        later = rounds[name][1:] or rounds[name]
        row |= {column: statistics.median(r[column] for r in later) for column in rounds[name][0]}
        row["unet_step_s"] = unet_steps(export, backend, precision, args.steps)
        rows.append(row)
    stamp = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(), "model": args.model}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**stamp, **row}) + "\n")
    table = markdown_table(rows, stamp)
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    return rows


def markdown_table(rows: list[dict[str, Any]], stamp: dict[str, str]) -> str:
    lines = [
        f"LoRA swap cost, {stamp['model']} export, {stamp['cpu']}, {stamp['time']} (seconds; the call + the "
        "next 256² 1-step generation beyond the one just before it, and in parentheses the call alone; first load: "
        "round 1, the others: medians of the rounds after)",
        "",
        f"| backend | {FIRST} | " + " | ".join(COLUMNS) + " |",
        "| --- " * (len(COLUMNS) + 2) + "|",
    ]
    for row in rows:  # the call alone in parentheses
        cells = [f"{row[FIRST]:.2f}"] + [
            f"{row[c]:.2f} ({row[f'{c} call']:.2f})" if f"{c} call" in row else f"{row[c]:.2f}" for c in COLUMNS
        ]
        lines.append(f"| {row['backend']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "UNet step, batch 2 at 256² (seconds before; the others as a ratio to it): before = the session the backend "
        "runs until the first adapter loads (ort-cpu: ONNX Runtime's fused graph), plain graph = ort-cpu's unfused "
        "graph without branches, rank 0 = branched without an adapter (after an unload), rank 16 = an "
        "adapter of rank 16 on every attention projection; static 16 = OpenVINO with branches of a fixed rank 16 (the "
        "candidate with no dynamic shapes: factors zero-padded)",
        "",
        "| backend | before | " + " | ".join(STEP_KINDS) + " |",
        "| --- " * (len(STEP_KINDS) + 2) + "|",
    ]
    for row in rows:
        steps = row["unet_step_s"]
        ratios = [f"{steps[k] / steps['before']:.3f}×" if k in steps else "–" for k in STEP_KINDS]
        lines.append(f"| {row['backend']} | {steps['before']:.3f} s | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"
