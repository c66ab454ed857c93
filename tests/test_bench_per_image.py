"""Per-image benchmark rows: step-cache intervals and the tiny VAE beside each backend's plain row, one run."""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks import per_image
from benchmarks.run import run
from sdtrt.engine.manifest import load_manifest


def test_rows_per_interval_and_vae(tiny_model_dir: Path, tiny_export: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)  # the run attaches the step-cache graphs and a tiny VAE to it
    options = ["--warmup", "0", "--timed-steps", "1", "--steps", "4", "--device", "cpu", "--threads", "1"]
    model = ["--model", str(tiny_model_dir), "--export", str(export), "--root", str(tmp_path / "cache")]
    size = ["--height", "128", "--width", "128", "--no-report", "--out", str(tmp_path / "rows.jsonl")]
    rows = run([*model, *size, *options, "--backend", "ort-cpu", "torch", "--cache-interval", "2", "--tiny-vae"])
    assert [r["status"] for r in rows] == ["ok"] * 5
    ours = {(r["cache_interval"], r["vae"]) for r in rows if r["backend"] == "ort-cpu"}
    assert ours == {(1, "full"), (1, "tiny"), (2, "full"), (2, "tiny")}
    assert [(r["cache_interval"], r["vae"]) for r in rows if r["backend"] == "torch"] == [(1, "full")]
    manifest = load_manifest(export)
    assert manifest.step_cache is not None and manifest.tiny_vae is not None
    table = per_image.table(rows)
    assert table.count("| ort-cpu (fp32) | 128x128 | 2 | 4 |") == 4
    assert "| 1 | full |" in table and "| 1.00x |" in table


def test_lcm_rows_full_and_tiny_vae(tmp_path: Path) -> None:
    """The 4-step LCM rows: an LCM-distilled model's own scheduler, UNet batch 1 (its guidance is embedded, never
    a CFG batch), the full and the tiny VAE side by side."""
    from sdtrt.export.tiny import build_tiny_lcm

    model = build_tiny_lcm(tmp_path / "lcm")
    options = ["--warmup", "0", "--timed-steps", "1", "--device", "cpu", "--threads", "1", "--no-report"]
    lcm = ["--scheduler", "lcm", "--steps", "4", "--batch", "1", "--tiny-vae", "--height", "128", "--width", "128"]
    where = ["--model", str(model), "--root", str(tmp_path / "cache"), "--out", str(tmp_path / "rows.jsonl")]
    rows = run([*where, *lcm, *options, "--backend", "ort-cpu"])
    assert [(r["status"], r["vae"], r["scheduler"], r["cfg"], r["images"]) for r in rows] == [
        ("ok", "full", "lcm", False, 1),
        ("ok", "tiny", "lcm", False, 1),
    ]
    assert all(r["loop_steps"] == 4 for r in rows)
    assert per_image.table(rows).count("| ort-cpu (fp32) | 128x128 | 1 | 4 | 1 |") == 2
