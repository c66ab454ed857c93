"""What people look at: a markdown table of a run (with the targets), and a PNG (it/s; latency breakdown).

python -m benchmarks.report benchmarks/results/cpu.jsonl   # re-render the file's latest run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import SDTRT_BACKENDS, TORCH_BACKENDS
from sdtrt.engine.fsutil import atomic_path, write_bytes_atomic

# the targets; each is judged on the rows of one run
GPU_STEP_SPEEDUP = 1.2  # best sdtrt GPU backend vs diffusers + torch.compile + CUDA graph, SD-1.5 512² batch 2
GPU_OVERHEAD = 0.03  # share of a step outside the UNet
GPU_E2E_MS = 250.0  # 30 steps, 512², one image with CFG
CPU_FP32_SPEEDUP = 2.0  # best sdtrt CPU backend vs diffusers fp32 on the CPU, per UNet step and end to end
CPU_BF16_SPEEDUP = 1.2  # best sdtrt CPU backend vs diffusers bf16 on the CPU, per UNet step and end to end
CPU_RSS_RATIO = 0.5  # the best sdtrt CPU backend's peak RSS over diffusers fp32's


def load_rows(path: str | os.PathLike[str], latest_run: bool = True) -> list[dict[str, Any]]:
    """The rows of a JSONL file; with ``latest_run`` only those of its last run."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if latest_run and rows:
        rows = [r for r in rows if r["run_id"] == rows[-1]["run_id"]]
    return rows


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _seconds(row: dict[str, Any]) -> str:
    parts = []
    if row.get("export_s") is not None:
        parts.append(f"export {row['export_s']:.0f}" + (" (cached)" if row.get("export_cached") else ""))
    parts.append(f"load {row['load_s']:.1f}")
    if row.get("compile_s") is not None:
        parts.append(f"compile {row['compile_s']:.1f}")
    return ", ".join(parts)


def _memory(row: dict[str, Any]) -> str:
    if row.get("peak_memory_mib") is None:
        return "–"
    kind = "VRAM" if row["device"] == "cuda" else "RSS"
    return f"{row['peak_memory_mib'] / 1024:.2f} GiB {kind}"


def _versus(row: dict[str, Any], peer: str) -> str:
    ratio = row.get("vs", {}).get(peer)
    if ratio is None:
        return "–"
    text = f"**{ratio['unet_speedup']:.2f}×** ("
    if "unet_cpu_speedup" in ratio:
        text += f"CPU time {ratio['unet_cpu_speedup']:.2f}×, "
    text += f"e2e {ratio['e2e_speedup']:.2f}×"
    if "memory_ratio" in ratio:
        text += f", mem {ratio['memory_ratio']:.2f}"
    return text + ")"


def _load_line(rows: Sequence[dict[str, Any]]) -> str:
    """The machine's load while the rows were measured: other people's jobs slow a shared machine down."""
    loads = [x for r in rows for x in r.get("load_avg") or []]
    if not loads:
        return ""
    line = f"Machine load (1-minute average) while measuring: {min(loads):.1f} to {max(loads):.1f}."
    together = sorted({r["backend"] for r in rows if r.get("interleaved")})
    if together:
        line += f" {', '.join(together)} were measured side by side, taking turns step by step."
    return line


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The run's table, its skipped backends and the targets, as markdown."""
    if not rows:
        return "no rows\n"
    first = rows[0]
    peers = [p for p in TORCH_BACKENDS if any(r["backend"] == p and r["status"] == "ok" for r in rows)]
    gpu = first.get("gpu") or "none"
    lines = [
        f"Model `{first['model']}` ({first['pipeline']}), {first['steps']} steps of {first['scheduler']}, "
        f"run {first['run_id']} on {first['timestamp'][:10]}.",
        f"CPU: {first['cpu']} ({first['cpu_cores']} cores; {first['threads']} thread(s) per backend); GPU: {gpu}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()) + ".",
        _load_line(rows),
        "",
        f"UNet ms/step: wall-clock median (p90) of {first['timed_steps']} steps after {first['warmup']} warm-up; "
        "CPU ms/step: the process's CPU time per step (median): time computing, not waiting for a core. "
        "it/s and the share outside the UNet (scheduler, CFG arithmetic, copies) come from the end-to-end run. "
        "Ratios against each peer of the same run: speed-ups (peer time / row time) and peak memory (row / peer).",
        "",
    ]
    header = ["backend", "precision", "size", "batch", "UNet ms/step", "CPU ms/step", "it/s", "text enc. ms"]
    header += ["VAE dec. ms"]
    header += ["end to end ms", "outside UNet", "peak memory", "seconds to ready"] + [f"vs {p}" for p in peers]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            continue
        cells = [
            f"{row['backend']} ({row['device']})",
            row["precision"],
            f"{row['width']}×{row['height']}",
            f"{row['batch']}" + (" (CFG)" if row["cfg"] else ""),
            f"{_num(row['unet_ms_median'])} ({_num(row['unet_ms_p90'])})",
            _num(row["unet_cpu_ms_median"]),
            _num(row["it_per_s"], 2),
            _num(row["text_encoder_ms"]),
            _num(row["vae_decode_ms"]),
            _num(row["e2e_ms"], 0),
            f"{row['outside_unet_share'] * 100:.2f} %",
            _memory(row),
            _seconds(row),
        ] + [_versus(row, p) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    not_run = {(r["backend"], r["reason"]) for r in rows if r["status"] != "ok"}
    if not_run:
        lines += ["", "Not measured:"] + [f"- {backend}: {reason}" for backend, reason in sorted(not_run)]
    lines += ["", "| target | measured | status |", "| --- | --- | --- |"]
    lines += [f"| {target} | {measured} | {status} |" for target, measured, status in targets(rows)]
    return "\n".join(lines) + "\n"


def row_shape(row: dict[str, Any]) -> tuple:
    """What rows must share to be compared: model, size, batch, steps and scheduler."""
    return row["model"], row["height"], row["width"], row["batch"], row["steps"], row["scheduler"]


def _judged(met: bool) -> str:
    return "met" if met else "not met"


def targets(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(target, measured value, met / not met / not measurable here) for each of the issue's targets."""
    ok = [r for r in rows if r["status"] == "ok"]
    return _gpu_targets(ok) + _cpu_targets(ok)


def _gpu_targets(ok: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    h100 = [
        r
        for r in ok
        if r["device"] == "cuda"
        and "H100" in (r.get("gpu") or "")
        and r["model"] == "sd15"
        and (r["height"], r["width"], r["batch"]) == (512, 512, 2)
    ]
    ours_gpu = [r for r in h100 if r["backend"] in SDTRT_BACKENDS]
    no_h100 = "not measurable here: no SD-1.5 512² batch-2 rows of sdtrt's GPU backends on an H100 in this run"

    result = []
    target = (
        f"H100, SD-1.5 512² batch 2: best sdtrt UNet step ≥ {GPU_STEP_SPEEDUP}× diffusers + torch.compile + CUDA graph"
    )
    compiled = [r["vs"]["torch-compile"]["unet_speedup"] for r in ours_gpu if "torch-compile" in r["vs"]]
    if compiled:
        result.append((target, f"{max(compiled):.2f}×", _judged(max(compiled) >= GPU_STEP_SPEEDUP)))
    else:
        result.append((target, "–", no_h100 if not ours_gpu else "not measurable here: no torch-compile row"))

    best = min(ours_gpu, key=lambda r: r["unet_ms_median"], default=None)
    target = f"H100: runtime overhead ≤ {GPU_OVERHEAD:.0%} of a step"
    if best is None:
        result.append((target, "–", no_h100))
    else:
        share = best["outside_unet_share"]
        result.append((target, f"{share:.1%} ({best['backend']})", _judged(share <= GPU_OVERHEAD)))

    target = f"H100: 30-step 512² end to end ≤ {GPU_E2E_MS / 1000:.2f} s"
    thirty = [r for r in ours_gpu if r["steps"] == 30]
    if thirty:
        fastest = min(thirty, key=lambda r: r["e2e_ms"])
        e2e = fastest["e2e_ms"]
        result.append((target, f"{e2e / 1000:.3f} s ({fastest['backend']})", _judged(e2e <= GPU_E2E_MS)))
    else:
        result.append((target, "–", no_h100 if not ours_gpu else "not measurable here: run with --steps 30"))
    return result


def _cpu_targets(ok: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The CPU targets, once per shape measured: the best sdtrt CPU row (the fastest UNet step, so the highest
    UNet speed-up) against diffusers fp32 ("torch") and bf16 ("torch-bf16") on the CPU in the same run."""
    speed = [  # (target, the diffusers peer, the speed-up it asks for)
        (f"CPU: best sdtrt CPU backend ≥ {x:g}× diffusers {dtype} per UNet step and end to end", peer, x)
        for dtype, peer, x in (("fp32", "torch", CPU_FP32_SPEEDUP), ("bf16", "torch-bf16", CPU_BF16_SPEEDUP))
    ]
    memory = f"CPU: peak RSS of the best sdtrt CPU backend ≤ {CPU_RSS_RATIO:g}× diffusers fp32"
    ours = [r for r in ok if r["backend"] in SDTRT_BACKENDS and r["device"] == "cpu"]
    if not ours:
        missing = "not measurable here: no row of an sdtrt CPU backend in this run"
        return [(target, "–", missing) for target in [*(t for t, _, _ in speed), memory]]
    result = []
    for shape in dict.fromkeys(map(row_shape, ours)):
        best = min((r for r in ours if row_shape(r) == shape), key=lambda r: r["unet_ms_median"])
        peers = {r["backend"] for r in ok if r["device"] == "cpu" and row_shape(r) == shape}
        where = f"{best['backend']}; {best['model']} {best['width']}×{best['height']} batch {best['batch']}"
        where += f", {best['threads']} thread(s)"
        for target, peer, threshold in speed:
            vs = best["vs"].get(peer) if peer in peers else None
            if vs is None:
                result.append((target, "–", f"not measurable here: no {peer} row on the CPU in this run"))
                continue
            measured = f"{vs['unet_speedup']:.2f}× per step ({vs['unet_cpu_speedup']:.2f}× CPU time), "
            measured += f"{vs['e2e_speedup']:.2f}× end to end ({where})"
            met = min(vs["unet_speedup"], vs["e2e_speedup"]) >= threshold
            result.append((target, measured, _judged(met)))
        ratio = best["vs"].get("torch", {}).get("memory_ratio") if "torch" in peers else None
        if ratio is None:
            result.append((memory, "–", "not measurable here: no torch row on the CPU with its peak RSS in this run"))
        else:
            result.append((memory, f"{ratio:.2f}× ({where})", _judged(ratio <= CPU_RSS_RATIO)))
    return result


def plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Left: it/s by backend and size. Right: end-to-end latency by stage, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    if ok:
        _plot_speed(left, ok)
        _plot_stages(right, ok)
        fig.suptitle(f"{ok[0]['model']} on {ok[0]['device_name']}, {ok[0]['timestamp'][:10]}")
    else:
        fig.suptitle("no backend was measured in this run")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _plot_speed(ax: Any, ok: Sequence[dict[str, Any]]) -> None:
    """Grouped bars: one group per (size, batch), one bar per backend."""
    import numpy as np

    def shape(r: dict[str, Any]) -> tuple[int, int, int]:
        return r["width"], r["height"], r["batch"]

    shapes = list(dict.fromkeys(map(shape, ok)))
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        speed = {shape(r): r["it_per_s"] for r in ok if r["backend"] == backend}
        ax.bar(np.arange(len(shapes)) + i * width, [speed.get(s, 0) for s in shapes], width, label=backend)
    ax.set_xticks(np.arange(len(shapes)) + width * (len(backends) - 1) / 2)
    ax.set_xticklabels([f"{w}×{h}\nbatch {b}" for w, h, b in shapes])
    ax.set_ylabel("denoising steps per second (it/s)")
    ax.set_title("it/s by backend and size")
    ax.legend()


def _plot_stages(ax: Any, ok: Sequence[dict[str, Any]]) -> None:
    """One stacked bar per row: where its end-to-end seconds went."""
    import numpy as np

    stages = {
        "text encoder": lambda r: r["text_encoder_ms"],
        "UNet (in the loop)": lambda r: r["loop_ms"] * (1 - r["outside_unet_share"]),
        "outside the UNet (scheduler, copies)": lambda r: r["loop_ms"] * r["outside_unet_share"],
        "VAE decode": lambda r: r["vae_decode_ms"],
        "other": lambda r: max(0.0, r["e2e_ms"] - r["text_encoder_ms"] - r["loop_ms"] - r["vae_decode_ms"]),
    }
    labels = [f"{r['backend']}\n{r['width']}×{r['height']} b{r['batch']}" for r in ok]
    bottom = np.zeros(len(ok))
    for stage, value in stages.items():
        seconds = np.array([value(r) for r in ok]) / 1000
        ax.bar(labels, seconds, bottom=bottom, label=stage)
        bottom += seconds
    ax.set_ylabel("seconds")
    ax.set_title(f"end to end, {ok[0]['steps']} steps, by stage")
    ax.legend(fontsize="small")
    ax.tick_params(axis="x", labelsize="small")


def write_report(
    rows: Sequence[dict[str, Any]], md_path: str | os.PathLike[str], png_path: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Write the run's markdown table and its PNG; return their paths."""
    write_bytes_atomic(md_path, markdown(rows).encode())
    plot(rows, png_path)
    return Path(md_path), Path(png_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", type=Path, help="a results file written by benchmarks.run")
    args = parser.parse_args(argv)
    md, png = write_report(load_rows(args.jsonl), args.jsonl.with_suffix(".md"), args.jsonl.with_suffix(".png"))
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
