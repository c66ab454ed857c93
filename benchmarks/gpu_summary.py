"""The GPU check's verdict (benchmarks/gpu_check.sh): its rows against issue 12's targets, as markdown.

    python -m benchmarks.gpu_summary benchmarks/results/gpu-check

Targets, as ratios within one run: the ort-cuda UNet step at least as fast as diffusers + torch.compile
(+ CUDA graph; the goal is 1.2x), on SD-1.5-shaped 512x512 and SDXL-shaped 1024x1024, batch 2; the 30-step
512x512 run end to end in 0.30 s at most; ort-cuda's VRAM at most 1.1x diffusers eager's. The options
files give ort-cuda's UNet step and VRAM under each CUDA provider option set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

UNET_TARGET, UNET_GOAL, E2E_TARGET_MS, VRAM_TARGET = 1.0, 1.2, 300.0, 1.1


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _ours(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["backend"] == "ort-cuda" and r["status"] == "ok"), None)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "**not met**")


def _targets(name: str, rows: list[dict[str, Any]]) -> list[str]:
    ours = _ours(rows)
    if ours is None:
        reasons = "; ".join(f"{r['backend']}: {r.get('reason', r['status'])}" for r in rows if r["status"] != "ok")
        return [f"| {name} | ort-cuda did not run | | {reasons} |"]
    vs = ours.get("vs", {})
    compiled = vs.get("torch-compile", {}).get("unet_speedup")
    memory = vs.get("torch", {}).get("memory_ratio")
    unet_ok = None if compiled is None else compiled >= UNET_TARGET
    vram_ok = None if memory is None else memory <= VRAM_TARGET
    vram = ours["peak_memory_mib"] / 1024
    lines = [
        f"| {name} | UNet step vs torch.compile + CUDA graph ≥ {UNET_TARGET} (goal {UNET_GOAL}) "
        f"| {_num(compiled)}× ({ours['unet_ms_median']:.2f} ms) | {_verdict(unet_ok)} |",
        f"| {name} | VRAM vs diffusers eager ≤ {VRAM_TARGET} | {_num(memory)}× ({vram:.2f} GiB) "
        f"| {_verdict(vram_ok)} |",
    ]
    for peer in ("torch", "torch-graph"):
        if (speedup := vs.get(peer, {}).get("unet_speedup")) is not None:
            lines.append(f"| {name} | UNet step vs {peer} | {speedup:.2f}× | |")
    if ours["height"] == 512 and ours["steps"] == 30:
        lines.append(
            f"| {name} | 30 steps end to end ≤ {E2E_TARGET_MS / 1000:.2f} s | {ours['e2e_ms'] / 1000:.3f} s "
            f"| {_verdict(ours['e2e_ms'] <= E2E_TARGET_MS)} |"
        )
    return lines


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def summary(folder: Path) -> str:
    gpu = (folder / "gpu.csv").read_text(encoding="utf-8").splitlines()[-1] if (folder / "gpu.csv").is_file() else "?"
    out = [f"GPU: {gpu}", "", "| run | target | measured | verdict |", "| --- | --- | --- | --- |"]
    for name in ("sd15", "sdxl"):
        if (path := folder / f"{name}.jsonl").is_file():
            out += _targets(name, _rows(path))
    options = sorted(folder.glob("options-*.jsonl"))
    if options:
        out += [
            "",
            "| SDTRT_ORT_CUDA_OPTIONS | UNet ms (median) | end to end ms | VRAM GiB |",
            "| --- | --- | --- | --- |",
        ]
        for path in options:
            ours = _ours(_rows(path))
            name = path.stem.removeprefix("options-")
            if ours is None:
                out.append(f"| {name} | failed | | |")
            else:
                vram = ours["peak_memory_mib"] / 1024
                out.append(f"| {name} | {ours['unet_ms_median']:.2f} | {ours['e2e_ms']:.0f} | {vram:.2f} |")
    for path in sorted(folder.glob("*-parity.json")):
        for network, result in json.loads(path.read_text(encoding="utf-8")).items():
            errors = ", ".join(
                f"{n} {e:.3g} of scale {result['scale'][n]:.3g}" for n, e in result["max_abs_error"].items()
            )
            verdict = "within" if result["ok"] else "**above**"
            out.append(
                f"{path.stem}: {network} fused vs plain fp16, max error {errors}: {verdict} {result['tolerance']}×"
            )
    if (log := folder / "tests.log").is_file():
        out += ["", "tests: " + (log.read_text(encoding="utf-8").strip().splitlines() or ["(empty log)"])[-1]]
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu-check")))
