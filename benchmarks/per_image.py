"""Per-image rows: step caching (DeepCache) and the tiny VAE, each measured beside the same backend without them.

``python -m benchmarks.run --cache-interval 1 3 5 --tiny-vae`` measures, for every sdtrt backend, one row per
(cache interval, VAE) pair in the same interleaved run; the export gets the step-cache graphs and a tiny VAE of
TAESD's own config attached once (benchmarks/prepare.py). The table here puts images/s and the VAE decode time
of each row beside its backend's plain row (interval 1, full VAE). An LCM-distilled model's rows, where the VAE
weighs most: ``--scheduler lcm --steps 4 --batch 1 --tiny-vae`` (its guidance is embedded: UNet batch 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.harness import TORCH_BACKENDS

Variant = tuple[int, str]  # (cache interval, vae)
PLAIN: Variant = (1, "full")


def variants(backend: str, intervals: Sequence[int], tiny_vae: bool) -> list[Variant]:
    """The (cache interval, VAE) pairs measured on ``backend``: the diffusers peers run only the plain one."""
    if backend in TORCH_BACKENDS:
        return [PLAIN]
    vaes = ("full", "tiny") if tiny_vae else ("full",)
    return [(interval, vae) for interval in dict.fromkeys([1, *intervals]) for vae in vaes]


def images_per_s(row: dict[str, Any]) -> float:
    """Images an end-to-end txt2img run made per second (text encoder, loop and VAE decode)."""
    return row["images"] / (row["e2e_ms"] / 1000)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of the measured sdtrt rows, each against its backend's plain row at the same shape."""
    ok = [r for r in rows if r["status"] == "ok" and r["backend"] not in TORCH_BACKENDS]
    plain = {(r["backend"], r["height"], r["width"], r["batch"]): r for r in ok if _variant(r) == PLAIN}
    lines = [
        "| backend | size | UNet batch | steps | cache interval | VAE | images/s | vs plain "
        "| VAE decode ms | vs full VAE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ok:
        base = plain.get((row["backend"], row["height"], row["width"], row["batch"]))
        speedup = f"{images_per_s(row) / images_per_s(base):.2f}x" if base else "-"
        decode = f"{base['vae_decode_ms'] / row['vae_decode_ms']:.1f}x" if base else "-"
        lines.append(
            f"| {row['backend']} ({row['precision']}) | {row['width']}x{row['height']} | {row['batch']} | "
            f"{row['steps']} | {row['cache_interval']} | {row['vae']} | {images_per_s(row):.3f} | {speedup} | "
            f"{row['vae_decode_ms']:.0f} | {decode} |"
        )
    return "\n".join(lines)


def _variant(row: dict[str, Any]) -> Variant:
    return row.get("cache_interval", 1), row.get("vae", "full")
